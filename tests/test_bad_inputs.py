"""Bad input, end to end: one test per row of docs/bad_inputs.md, asserting the exception type and its message.

The messages are the ones real runs print; when one changes, change the table with it.
"""
import copy

import pytest
import torch
from torch import nn

import mbkernels
from conftest import ALL_BACKENDS, DEVICE, HAS_GPU
from oracle import dwconv64, se64
from mbkernels import activations, ops
from mbkernels.nn import SqueezeExcite

C, R = 5, 3


def x_():
    return torch.randn(2, C, 7, 9, device=DEVICE)


def w_():
    return torch.randn(C, 1, 3, 3, device=DEVICE)


def b_(size=C):
    return torch.randn(size, device=DEVICE)


def dw(x=None, weight=None, bias=None, **kwargs):
    x = x_() if x is None else x
    weight = w_() if weight is None else weight
    bias = b_() if bias is None else bias
    return ops.dwconv_bn_act(x, weight, bias, **kwargs)


def se(x=None, w_reduce=None, b_reduce=None, w_expand=None, b_expand=None, **kwargs):
    x = x_() if x is None else x
    w_reduce = torch.randn(R, C, device=DEVICE) if w_reduce is None else w_reduce
    w_expand = torch.randn(C, R, device=DEVICE) if w_expand is None else w_expand
    return ops.squeeze_excite(x, w_reduce, b_reduce, w_expand, b_expand, **kwargs)


def depthwise_conv():
    return nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False)


class ShiftedConv(nn.Conv2d):
    """A Conv2d subclass whose forward computes something else."""

    def forward(self, x):
        return super().forward(x) + 1


def mixed_conv(*convs) -> nn.Module:
    """A MixedConv2d-like module: depthwise convs over consecutive channel groups."""
    return nn.ModuleDict({str(i): conv for i, conv in enumerate(convs)})


class SEModule(nn.Module):
    """timm's SEModule with a norm after fc1 (rexnet's), here with the norm given."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.fc1, self.bn, self.act = nn.Conv2d(C, R, 1), norm, nn.ReLU()
        self.fc2, self.gate = nn.Conv2d(R, C, 1), nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True))))))


def se_with_norm(norm: nn.Module) -> nn.Module:
    return SEModule(norm).eval()


class OneLayerSE(nn.Module):
    """An effective SE (x * gate(fc(mean_hw(x)))), here with fc's width and an activation given."""

    def __init__(self, out_channels: int, act: nn.Module = None):
        super().__init__()
        self.fc, self.act, self.gate = nn.Conv2d(C, out_channels, 1), act or nn.Identity(), nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.act(self.fc(x.mean((2, 3), keepdim=True))))


# (row id in docs/bad_inputs.md, the call, the exception type, its exact message)
ROWS = [
    ("dw-x-float64", lambda: dw(x=x_().double()), ValueError,
     "x must be float32, float16 or bfloat16, got torch.float64"),
    ("dw-x-int", lambda: dw(x=x_().int()), ValueError, "x must be float32, float16 or bfloat16, got torch.int32"),
    ("dw-x-3d", lambda: dw(x=x_()[0]), ValueError, "x must be a 4-D [N, C, H, W] tensor, got shape (5, 7, 9)"),
    ("dw-weight-meta", lambda: dw(weight=w_().to("meta")), ValueError,
     f"weight is on meta but x is on {DEVICE}; put them on one device"),
    ("dw-x-meta", lambda: dw(x=x_().to("meta")), ValueError,
     f"weight is on {DEVICE} but x is on meta; put them on one device"),
    ("dw-weight-not-depthwise", lambda: dw(weight=torch.randn(C, 2, 3, 3, device=DEVICE)), ValueError,
     "weight must be [C * M, 1, kh, kw] with C = 5 (x's channels) and M >= 1 for a depthwise conv, got (5, 2, 3, 3); "
     "a conv that is not depthwise (groups != channels) cannot be fused"),
    ("dw-weight-channels", lambda: dw(weight=torch.randn(4, 1, 3, 3, device=DEVICE)), ValueError,
     "weight must be [C * M, 1, kh, kw] with C = 5 (x's channels) and M >= 1 for a depthwise conv, got (4, 1, 3, 3); "
     "a conv that is not depthwise (groups != channels) cannot be fused"),
    ("dw-weight-3d", lambda: dw(weight=torch.randn(C, 3, 3, device=DEVICE)), ValueError,
     "weight must be a 4-D tensor, got shape (5, 3, 3)"),
    ("dw-weight-int", lambda: dw(weight=w_().int()), ValueError,
     "weight must be a floating-point tensor, got torch.int32"),
    ("dw-bias-size", lambda: dw(bias=b_(4)), ValueError, "bias must be [C * M] = [5], got (4,)"),
    ("dw-bias-none", lambda: ops.dwconv_bn_act(x_(), w_(), None), ValueError,
     "bias must be a Tensor, got NoneType"),
    ("dw-stride-0", lambda: dw(stride=0), ValueError, "stride must be two ints >= 1, got [0, 0]"),
    ("dw-stride-triple", lambda: dw(stride=(1, 1, 1)), ValueError,
     "stride must be an int or a pair of ints, got (1, 1, 1)"),
    ("dw-padding-negative", lambda: dw(padding=-1), ValueError, "padding must be two ints >= 0, got [-1, -1]"),
    ("dw-dilation-0", lambda: dw(dilation=0), ValueError, "dilation must be two ints >= 1, got [0, 0]"),
    ("dw-kernel-too-big", lambda: dw(weight=torch.randn(C, 1, 9, 9, device=DEVICE), padding=0), ValueError,
     "the output would be empty (-1x1): kernel (9, 9) with dilation [1, 1] does not fit x's 7x9 plane "
     "padded by [0, 0]"),
    ("dw-empty-plane", lambda: dw(x=x_()[:, :, :0]), ValueError,
     "the output would be empty (0x9): kernel (3, 3) with dilation [1, 1] does not fit x's 0x9 plane "
     "padded by [1, 1]"),
    ("dw-activation", lambda: dw(activation="mish"), ValueError,
     "unknown activation 'mish'; expected one of identity, relu, relu6, hardswish, silu, gelu, gelu_tanh, leaky_relu"),
    ("dw-activation-parameter", lambda: dw(activation="relu:0.5"), ValueError,
     "activation 'relu' takes no parameter, got 'relu:0.5'"),
    ("dw-activation-bad-parameter", lambda: dw(activation="leaky_relu:x"), ValueError,
     "activation 'leaky_relu:x': the parameter must be a finite number"),
    ("dw-padding-four", lambda: dw(padding=(1, 1, -1, 0)), ValueError, "padding must be four ints >= 0, got [1, 1, -1, 0]"),
    ("dw-padding-three", lambda: dw(padding=(1, 1, 1)), ValueError,
     "padding must be an int, a pair of ints or four ints [top, bottom, left, right], got (1, 1, 1)"),
    ("dw-backend", lambda: dw(backend="foo"), ValueError,
     "unknown backend 'foo'; expected one of cuda, triton, reference"),
    ("se-backend", lambda: se(backend="nope"), ValueError,
     "unknown backend 'nope'; expected one of cuda, triton, reference"),
    ("se-x-float64", lambda: se(x=x_().double()), ValueError,
     "x must be float32, float16 or bfloat16, got torch.float64"),
    ("se-w-reduce-3d", lambda: se(w_reduce=torch.randn(1, R, C, device=DEVICE)), ValueError,
     "w_reduce must be [R, C] (or [R, C, 1, 1]), got (1, 3, 5)"),
    ("se-w-reduce-none", lambda: ops.squeeze_excite(x_(), None, None, torch.randn(C, R, device=DEVICE), None),
     ValueError,
     "w_reduce must be [R, C] (or [R, C, 1, 1]), got NoneType"),
    ("se-w-reduce-channels", lambda: se(w_reduce=torch.randn(R, 4, device=DEVICE)), ValueError,
     "w_reduce must be [3, 5] (or [3, 5, 1, 1]), got (3, 4)"),
    ("se-w-reduce-3x3", lambda: se(w_reduce=torch.randn(R, C, 3, 3, device=DEVICE)), ValueError,
     "w_reduce must be a 2-D tensor, got shape (3, 5, 3, 3)"),
    ("se-w-reduce-int", lambda: se(w_reduce=torch.randint(0, 3, (R, C), device=DEVICE)), ValueError,
     "w_reduce must be a floating-point tensor, got torch.int64"),
    ("se-w-expand-transposed", lambda: se(w_expand=torch.randn(R, C, device=DEVICE)), ValueError,
     "w_expand must be [5, 3] (or [5, 3, 1, 1]), got (3, 5)"),
    ("se-w-reduce-meta", lambda: se(w_reduce=torch.randn(R, C, device="meta")), ValueError,
     f"w_reduce is on meta but x is on {DEVICE}; put them on one device"),
    ("se-b-reduce-size", lambda: se(b_reduce=b_(4)), ValueError, "b_reduce must be [3], got (4,)"),
    ("se-b-expand-size", lambda: se(b_expand=b_(4)), ValueError, "b_expand must be [5], got (4,)"),
    ("se-activation", lambda: se(activation="mish"), ValueError,
     "unknown activation 'mish'; expected one of identity, relu, relu6, hardswish, silu, gelu, gelu_tanh, leaky_relu"),
    ("se-gate", lambda: se(gate="tanh"), ValueError, "unknown gate 'tanh'; expected one of sigmoid, hardsigmoid"),
    ("fold-bn-no-stats", lambda: ops.fold_bn(depthwise_conv(), nn.BatchNorm2d(C, track_running_stats=False)),
     ValueError, "bn has no running statistics (track_running_stats=False) and cannot be folded"),
    ("fold-bn-features", lambda: ops.fold_bn(depthwise_conv(), nn.BatchNorm2d(4)), ValueError,
     "bn has 4 features but conv has 5 output channels"),
    ("module-not-depthwise", lambda: mbkernels.nn.DWConvBNAct(nn.Conv2d(C, C, 3)), ValueError,
     "conv is not depthwise: groups=1, in_channels=5, out_channels=5 (groups must equal in_channels, and "
     "out_channels be a multiple of it)"),
    ("module-activation", lambda: mbkernels.nn.DWConvBNAct(depthwise_conv(), None, nn.Mish()), ValueError,
     "activation Mish has no fused kernel; supported: identity, relu, relu6, hardswish, silu, gelu, gelu_tanh, "
     "leaky_relu"),
    ("module-bn-no-stats",
     lambda: mbkernels.nn.DWConvBNAct(depthwise_conv(), nn.BatchNorm2d(C, track_running_stats=False)), ValueError,
     "BatchNorm2d has no running statistics (track_running_stats=False): it normalises with batch statistics and "
     "cannot be folded"),
    ("module-padding-reflect",
     lambda: mbkernels.nn.DWConvBNAct(nn.Conv2d(C, C, 3, groups=C, padding=1, padding_mode="reflect")),
     ValueError, "conv has padding_mode='reflect'; only zero padding is fused"),
    # Asymmetric padding, depth multiplier, the new activations, the mixed conv and the SE's norm (issue 13).
    ("dw-padding-asymmetric-empty", lambda: dw(weight=torch.randn(C, 1, 9, 9, device=DEVICE), padding=(0, 1, 0, 1)),
     ValueError, "the output would be empty (0x2): kernel (9, 9) with dilation [1, 1] does not fit x's 7x9 plane "
     "padded by [0, 1, 0, 1]"),
    ("dw-multiplier-bias", lambda: dw(weight=torch.randn(2 * C, 1, 3, 3, device=DEVICE)), ValueError,
     "bias must be [C * M] = [10], got (5,)"),
    ("dw-multiplier-not-integral", lambda: dw(weight=torch.randn(7, 1, 3, 3, device=DEVICE), bias=b_(7)), ValueError,
     "weight must be [C * M, 1, kh, kw] with C = 5 (x's channels) and M >= 1 for a depthwise conv, got (7, 1, 3, 3); "
     "a conv that is not depthwise (groups != channels) cannot be fused"),
    ("dw-activation-gelu-parameter", lambda: dw(activation="gelu:0.5"), ValueError,
     "activation 'gelu' takes no parameter, got 'gelu:0.5'"),
    ("dw-activation-leaky-inf", lambda: dw(activation="leaky_relu:inf"), ValueError,
     "activation 'leaky_relu:inf': the parameter must be a finite number"),
    ("se-activation-leaky-nan", lambda: se(activation="leaky_relu:nan"), ValueError,
     "activation 'leaky_relu:nan': the parameter must be a finite number"),
    ("module-grouped", lambda: mbkernels.nn.DWConvBNAct(nn.Conv2d(4, 6, 3, groups=2)), ValueError,
     "conv is not depthwise: groups=2, in_channels=4, out_channels=6 (groups must equal in_channels, and "
     "out_channels be a multiple of it)"),
    ("module-conv-subclass", lambda: mbkernels.nn.DWConvBNAct(ShiftedConv(C, C, 3, groups=C)), ValueError,
     "conv is a ShiftedConv, whose forward differs from nn.Conv2d's and computes no zero-padded conv of its "
     "weights on probes (neither its own padding, a zero-padding module before it, nor TensorFlow 'SAME')"),
    ("mixed-odd-even",
     lambda: mbkernels.nn.MixedDWConvBNAct(mixed_conv(depthwise_conv(), nn.Conv2d(C, C, 4, groups=C))), ValueError,
     "the kernels of ModuleDict ((3, 3), (4, 4)) cannot all be centred in the largest one (their sizes "
     "differ by an odd number)"),
    ("mixed-strides", lambda: mbkernels.nn.MixedDWConvBNAct(
        mixed_conv(depthwise_conv(), nn.Conv2d(C, C, 5, stride=2, padding=2, groups=C))), ValueError,
     "the groups of ModuleDict differ in stride, dilation, depth multiplier or padding kind; only groups that differ "
     "in kernel size alone are fused"),
    ("mixed-not-convs", lambda: mbkernels.nn.MixedDWConvBNAct(nn.Sequential(depthwise_conv(), nn.ReLU())), ValueError,
     "Sequential is not a mixed depthwise conv: its children must be two or more Conv2d, got Conv2d, ReLU"),
    ("mixed-group-not-depthwise",
     lambda: mbkernels.nn.MixedDWConvBNAct(mixed_conv(depthwise_conv(), nn.Conv2d(C, C, 3))), ValueError,
     "group 1 of ModuleDict: conv is not depthwise: groups=1, in_channels=5, out_channels=5 (groups must "
     "equal in_channels, and out_channels be a multiple of it)"),
    ("mixed-paddings", lambda: mbkernels.nn.MixedDWConvBNAct(
        mixed_conv(depthwise_conv(), nn.Conv2d(C, C, 5, padding=1, groups=C))), ValueError,
     "the groups' paddings ([1, 1, 1, 1], [1, 1, 1, 1]) do not line up once their kernels are centred in the largest; "
     "such a mixed conv cannot run as one depthwise conv"),
    ("se-norm-batch-stats",
     lambda: SqueezeExcite.from_module(se_with_norm(nn.BatchNorm2d(R, track_running_stats=False))), ValueError,
     "SEModule.bn is a BatchNorm2d without running statistics; only a BatchNorm of the 3 reduced channels "
     "with running statistics can be folded into the reduce layer"),
    ("se-norm-features", lambda: SqueezeExcite.from_module(se_with_norm(nn.BatchNorm2d(C))), ValueError,
     "SEModule.bn is a BatchNorm2d of 5 features; only a BatchNorm of the 3 reduced channels with running statistics "
     "can be folded into the reduce layer"),
    ("se-one-layer-not-square", lambda: SqueezeExcite.from_module(OneLayerSE(R)), ValueError,
     "OneLayerSE has one layer, fc, mapping 5 -> 3 channels; a one-layer (effective) SE maps C -> C"),
    ("se-one-layer-activation", lambda: SqueezeExcite.from_module(OneLayerSE(C, nn.ReLU())), ValueError,
     "OneLayerSE with one layer needs one gate (sigmoid, hardsigmoid) and no activation: act (ReLU) computes relu, "
     "gate (Sigmoid) computes sigmoid"),
]


@pytest.mark.parametrize("call, error, message", [pytest.param(*row[1:], id=row[0]) for row in ROWS])
def test_bad_input_raises(call, error, message):
    with pytest.raises(error) as raised:
        call()
    assert str(raised.value) == message


def test_dw_backend_env(monkeypatch):
    """Row dw-backend-env: MBKERNELS_BACKEND names no backend."""
    monkeypatch.setenv("MBKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError) as raised:
        dw()
    assert str(raised.value) == "unknown MBKERNELS_BACKEND 'bogus'; expected one of cuda, triton, reference"


def test_dw_x_not_a_tensor():
    """Row dw-x-list: named before torch's schema check can print its long message."""
    with pytest.raises(ValueError, match=r"^x must be a Tensor, got list$"):
        dw(x=[1.0])


def test_dw_stride_float():
    """Row dw-stride-float: a float stride is named in a ValueError like the other bad pairs."""
    with pytest.raises(ValueError) as raised:
        dw(stride=1.5)
    assert str(raised.value) == "stride must be an int or a pair of ints, got 1.5"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dw_zero_channels(backend):
    """Row dw-zero-channels: C = 0 gives an empty output, as N = 0 does."""
    x = torch.randn(2, 0, 7, 9, device=DEVICE)
    y = ops.dwconv_bn_act(x, torch.randn(0, 1, 3, 3, device=DEVICE), torch.randn(0, device=DEVICE), backend=backend)
    assert y.shape == (2, 0, 7, 9)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batch_gives_empty_output(backend):
    """Rows dw-empty-batch, se-empty: no error, an empty output of the right shape (like stock)."""
    x = torch.randn(0, C, 7, 9, device=DEVICE)
    y = ops.dwconv_bn_act(x, w_(), b_(), stride=2, backend=backend)
    assert y.shape == (0, C, 4, 5)
    y = se(x=torch.randn(2, C, 0, 9, device=DEVICE), backend=backend)
    assert y.shape == (2, C, 0, 9)


def test_all_meta_gives_meta_output():
    """Row dw-all-meta: every tensor on meta runs the fake kernel: shapes only, no error."""
    y = ops.dwconv_bn_act(x_().to("meta"), w_().to("meta"), b_().to("meta"), stride=2)
    assert y.device.type == "meta" and y.shape == (2, C, 4, 5)


def test_dw_backward_is_refused():
    """Row dw-requires-grad: the op has no autograd formula; backward says so (nn.DWConvBNAct runs stock layers
    when gradients are needed)."""
    x = x_().requires_grad_()
    y = dw(x=x, backend="reference")
    # With mbkernels._C the schema is the C++ library's (its autograd kernel refuses); without, the Python op's.
    refusal = ("derivative for mbkernels::dwconv_bn_act is not implemented|Trying to backward through "
               "mbkernels.dwconv_bn_act.default but no autograd formula was registered")
    with pytest.raises(RuntimeError, match=refusal):
        y.sum().backward()


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU: weights on the CPU, x on the GPU")
def test_dw_weight_on_other_device():
    """Row dw-weight-cpu (GPU)."""
    with pytest.raises(ValueError) as raised:
        dw(weight=torch.randn(C, 1, 3, 3))
    assert str(raised.value) == f"weight is on cpu but x is on {DEVICE}; put them on one device"


# -------------------------------------------------------------------------------------- NaN and Inf inputs
def with_non_finite(x: torch.Tensor) -> torch.Tensor:
    """x with NaN, +Inf and -Inf at corners, edges and the middle of different images and channels."""
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    x[0, 2, 3, 4] = float("nan")
    x[1, 1, -1, -1] = float("inf")
    x[1, 3, 2, 0] = float("-inf")
    x[1, 4, 5, 6] = float("inf")
    x[1, 4, 5, 7] = float("-inf")  # an Inf and a -Inf in one window: NaN
    return x


def assert_same_non_finite(out: torch.Tensor, reference: torch.Tensor, nan_may_stand_for_inf=False) -> None:
    """NaN, +Inf and -Inf exactly where the float64 reference has them; the finite rest close to it.
    nan_may_stand_for_inf: torch's own float32 CPU gelu gives NaN at +Inf (float64 gives +Inf); a backend that is
    torch may too."""
    got, want = out.double().cpu(), reference.double().cpu()
    if nan_may_stand_for_inf:
        got = torch.where(torch.isnan(got) & torch.isposinf(want), want, got)
    for name, where in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(where(got), where(want)), (
            f"{name} at {int(where(got).sum())} positions, the reference has {int(where(want).sum())}; "
            f"differing at {(where(got) != where(want)).nonzero()[:5].tolist()}"
        )
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4 * want[finite].abs().max())


@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dw_non_finite_propagate_like_stock(backend, activation):
    """Row dw-nan-inf: NaN and Inf propagate as in stock conv + activation (never hidden by relu/clamps)."""
    x = with_non_finite(x_())
    weight, bias = w_(), b_()
    y = ops.dwconv_bn_act(x, weight, bias, activation=activation, backend=backend)
    reference = dwconv64(x, weight, bias, [1, 1], [1, 1], [1, 1], activation)
    assert_same_non_finite(y, reference, nan_may_stand_for_inf=backend == "reference" and activation == "gelu")


@pytest.mark.parametrize("gate", activations.GATES)
@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_se_non_finite_propagate_like_stock(backend, activation, gate):
    """Row se-nan-inf: a NaN pixel makes its image's pooled mean NaN and, through the MLP, the whole image NaN,
    as in stock; an Inf likewise; a clean image stays finite."""
    x = torch.cat([with_non_finite(x_()), x_()])  # images 0 (NaN) and 1 (Inf) poisoned, 2 and 3 clean
    w_reduce, b_reduce = torch.randn(R, C, device=DEVICE), b_(R)
    w_expand, b_expand = torch.randn(C, R, device=DEVICE), b_()
    y = ops.squeeze_excite(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate, backend)
    assert_same_non_finite(y, se64(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate),
                           nan_may_stand_for_inf=backend == "reference" and activation == "gelu")


# ------------------------------------------------------------------------------------------- patch/unpatch
def small_model() -> nn.Module:
    """A depthwise conv -> BN -> activation run and a squeeze-excite block: something patch would change."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.Hardswish(),
        nn.Conv2d(8, 4, 1),
    ).eval()


def module_tree(model: nn.Module):
    return [(name, type(module), id(module)) for name, module in model.named_modules()]


def test_patch_meta_model_refused_untouched():
    """Row patch-meta: a model built on the meta device has no weights to fold: a clear error, model untouched."""
    patch = mbkernels.patch
    with torch.device("meta"):
        model = small_model()
    before = module_tree(model)
    try:
        with pytest.raises(ValueError, match=r"on the meta device \(first: '0\.weight'\)"):
            patch(model)
    finally:
        assert module_tree(model) == before


def test_patch_half_loaded_model_refused_untouched():
    """Row patch-half-loaded: some tensors still on meta (a load that stopped half-way): a clear error naming the
    first of them, model untouched."""
    patch = mbkernels.patch
    model = small_model()
    model[2].to_empty(device="meta")  # the BatchNorm's parameters and statistics never loaded
    before = module_tree(model)
    try:
        with pytest.raises(ValueError, match=r"on the meta device \(first: '2\.weight'\)"):
            patch(model)
    finally:
        assert module_tree(model) == before


def test_unpatch_never_patched_is_a_no_op():
    """Row unpatch-unpatched: nothing to restore is not an error: unpatch returns the model unchanged (modules,
    state), and patch_report says nothing is fused."""
    unpatch = mbkernels.unpatch
    model = small_model()
    before, state = module_tree(model), copy.deepcopy(model.state_dict())
    assert unpatch(model) is model
    assert module_tree(model) == before
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert "fused: 0 dwconv+bn+act, 0 squeeze-excite" in str(mbkernels.patch_report(model))
