"""dwconv_bn_act: act(depthwise_conv2d(x, weight, bias)) with the BatchNorm folded into weight and bias.

The reference backend is held to stock nn.Conv2d + nn.BatchNorm2d + activation modules; every kernel backend to a
float64 conv over a covering set of shapes, layouts, dtypes and activations, with poisoned outputs. Then the
registered ops (opcheck, torch.compile), the DWConvBNAct module, bad input, and the choice of backend.
"""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mbkernels
from oracle import dwconv64, stock_activation
from conftest import (ALL_BACKENDS, DEVICE, DTYPES, HAS_GPU, KERNEL_BACKENDS, LAYOUTS, assert_close_to_reference,
                      backend_unavailable, random_x)
from mbkernels import _contract, _native, activations, dispatch, ops
from mbkernels._contract import DWConvArgs
from mbkernels.backends import OpSupport, declared as declared_backends, reference
from mbkernels.nn import DWConvBNAct
from mbkernels.match import randomize_batchnorm


# ------------------------------------------------------------------------------------------------ helpers
def random_bn(channels: int, affine: bool = True) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm2d with random statistics and affine parameters (the defaults would fold to ~1)."""
    return randomize_batchnorm(nn.BatchNorm2d(channels, affine=affine)).eval()


def depthwise_conv(channels, kernel_size, stride=1, padding=None, dilation=1, bias=False) -> nn.Conv2d:
    if padding is None:
        padding = dilation * (kernel_size // 2)
    return nn.Conv2d(channels, channels, kernel_size, stride, padding, dilation, groups=channels, bias=bias)


def random_weights(channels, kh, kw, device=DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded float32 weight [C, 1, kh, kw] and bias [C], scaled so outputs stay around 1."""
    weight = torch.randn(channels, 1, kh, kw, device=device) / (kh * kw) ** 0.5
    return weight, torch.randn(channels, device=device) * 0.5


def check_against_reference(backend, x, weight, bias, stride, padding, dilation, activation):
    """Run the op and hold it to the float64 reference; the inputs keep their values, the output x's layout."""
    inputs_before = [t.clone() for t in (x, weight, bias)]
    out = ops.dwconv_bn_act(x, weight, bias, stride, padding, dilation, activation, backend=backend)
    for name, tensor, before in zip(("x", "weight", "bias"), (x, weight, bias), inputs_before):
        assert torch.equal(tensor, before), f"the op modified {name}"
    assert_close_to_reference(out, dwconv64(x, weight, bias, stride, padding, dilation, activation), x.dtype)
    assert out.is_contiguous(memory_format=_contract.memory_format_of(x)), f"output strides {out.stride()}"


# ------------------------------------------------------------------------- the reference vs stock modules
@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_matches_stock_modules(activation, layout):
    channels, kernel_size, stride = 24, 5, 2
    conv, bn = depthwise_conv(channels, kernel_size, stride).to(DEVICE), random_bn(channels).to(DEVICE)
    stock = nn.Sequential(conv, bn, stock_activation(activation)).double()
    x = random_x((2, channels, 15, 17), layout=layout)
    weight, bias = ops.fold_bn(conv, bn)
    out = ops.dwconv_bn_act(x, weight, bias, stride, activation=activation, backend="reference")
    with torch.no_grad():
        want = stock(x.double())
    assert_close_to_reference(out, want, torch.float32)
    assert out.is_contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize(
    "conv_bias, bn_affine, use_bn",
    [(False, True, True), (True, True, True), (True, False, True), (False, False, True), (True, True, False)],
    ids=["bn", "conv_bias+bn", "conv_bias+bn_no_affine", "bn_no_affine", "conv_bias_only"],
)
def test_fold_bn_matches_conv_then_bn(conv_bias, bn_affine, use_bn):
    channels = 12
    conv = depthwise_conv(channels, 3, bias=conv_bias).double()
    if conv_bias:
        nn.init.normal_(conv.bias)
    bn = random_bn(channels, affine=bn_affine).double() if use_bn else None
    weight, bias = ops.fold_bn(conv, bn)
    assert weight.dtype == bias.dtype == torch.float32
    assert weight.shape == conv.weight.shape and bias.shape == (channels,)
    x = torch.randn(2, channels, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        want = bn(conv(x)) if use_bn else conv(x)
    got = F.conv2d(x, weight.double(), bias.double(), 1, 1, groups=channels)
    assert_close_to_reference(got.float(), want, torch.float32)


def test_fold_bn_without_running_stats_raises():
    bn = nn.BatchNorm2d(8, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        ops.fold_bn(depthwise_conv(8, 3), bn)


def test_fold_bn_with_mismatched_features_raises():
    with pytest.raises(ValueError, match="bn has 9 features"):
        ops.fold_bn(depthwise_conv(8, 3), random_bn(9))


# ------------------------------------------------------------------------ kernel backends vs float64 conv
# A covering set, not the cartesian product (far too slow under the interpreter): case i takes the i-th entry
# of each factor list, cycled. The cycles (12 (kernel, stride, layout) triples, 15 (activation, dtype) pairs,
# 7 shapes) are coprime enough that 34 cases hold every triple, every pair, and every shape with every kernel
# size, stride, layout and dtype. 112x112 planes come with small C only.
KERNEL_STRIDE_LAYOUT = list(itertools.product((3, 5, 7), (1, 2), LAYOUTS))
ACTIVATION_DTYPE = list(itertools.product(activations.ACTIVATIONS, DTYPES))
SHAPES = [(2, 7, 15, 17), (1, 72, 7, 7), (1, 1, 112, 112), (1, 120, 15, 17), (3, 120, 1, 1), (1, 7, 112, 112),
          (2, 72, 15, 17)]
MATRIX = [
    (*KERNEL_STRIDE_LAYOUT[i % len(KERNEL_STRIDE_LAYOUT)], *ACTIVATION_DTYPE[i % len(ACTIVATION_DTYPE)],
     SHAPES[i % len(SHAPES)])
    for i in range(34)
]


def _matrix_id(case):
    kernel, stride, layout, activation, dtype, shape = case
    return f"k{kernel}-s{stride}-{layout}-{activation}-{str(dtype)[6:]}-{'x'.join(map(str, shape))}"


@pytest.mark.parametrize("case", MATRIX, ids=[_matrix_id(c) for c in MATRIX])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_matches_reference(backend, case, poisoned_outputs):
    kernel, stride, layout, activation, dtype, shape = case
    x = random_x(shape, dtype, layout)
    weight, bias = random_weights(shape[1], kernel, kernel)
    padding = kernel // 2
    check_against_reference(backend, x, weight, bias, [stride] * 2, [padding] * 2, [1, 1], activation)


# (kernel (kh, kw), stride, padding, dilation): the shapes the fast paths don't take.
GENERIC = {
    "k1": ((1, 1), (1, 1), (0, 0), (1, 1)),
    "k9": ((9, 9), (1, 1), (4, 4), (1, 1)),
    "k4_even": ((4, 4), (1, 1), (1, 1), (1, 1)),
    "dilation2": ((3, 3), (1, 1), (2, 2), (2, 2)),
    "asymmetric_padding": ((3, 3), (1, 1), (0, 2), (1, 1)),
    "stride3": ((5, 5), (3, 3), (2, 2), (1, 1)),
    "k3x5_mixed": ((3, 5), (1, 2), (1, 2), (2, 1)),
    "no_padding_stride2": ((3, 3), (2, 2), (0, 0), (1, 1)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", GENERIC)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_generic_shapes(backend, name, layout, poisoned_outputs):
    (kh, kw), stride, padding, dilation = GENERIC[name]
    index = list(GENERIC).index(name)  # vary the rest of the case with it
    dtype = DTYPES[index % len(DTYPES)]
    activation = activations.ACTIVATIONS[index % len(activations.ACTIVATIONS)]
    shape = (2, 7, 15, 17) if index % 2 else (1, 72, 9, 10)
    x = random_x(shape, dtype, layout)
    weight, bias = random_weights(shape[1], kh, kw)
    check_against_reference(backend, x, weight, bias, list(stride), list(padding), list(dilation), activation)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_int64_offsets(layout, monkeypatch, poisoned_outputs):
    """The int64 offset path that tensors of 2**30 elements and more take, forced on a small case."""
    if not mbkernels.backend_status()["triton"].available:
        pytest.skip(f"triton backend unavailable: {mbkernels.backend_status()['triton'].reason}")
    from mbkernels.backends.triton import dwconv

    monkeypatch.setattr(dwconv, "INT64_ELEMENTS", 0)
    x = random_x((2, 24, 15, 17), torch.float16, layout)
    weight, bias = random_weights(24, 5, 5)
    check_against_reference("triton", x, weight, bias, [2, 2], [2, 2], [1, 1], "silu")


@pytest.mark.parametrize(
    "view",
    ["channel_slice", "permuted_to_channels_last", "permuted_hw", "w_strided"],
)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_input(backend, view, poisoned_outputs):
    base = torch.randn(2, 20, 13, 22, device=DEVICE)
    x = {
        "channel_slice": base[:, 3:14],
        "permuted_to_channels_last": base.permute(0, 2, 3, 1)[..., :11].permute(0, 3, 1, 2),
        "permuted_hw": base[:, :11].transpose(2, 3),
        "w_strided": base[:, :11, :, ::2],
    }[view]
    assert not x.is_contiguous()
    weight, bias = random_weights(11, 3, 3)
    check_against_reference(backend, x, weight, bias, [2, 1], [1, 1], [1, 1], "hardswish")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_weights_in_other_dtypes_and_layouts(backend, poisoned_outputs):
    """weight and bias of any float dtype, non-contiguous: the op hands float32 copies to the backend."""
    x = random_x((2, 16, 9, 9), torch.float16, "channels_last")
    weight = torch.randn(16, 1, 5, 3, device=DEVICE).transpose(2, 3).to(torch.float16)  # [16, 1, 3, 5]
    bias = torch.randn(32, device=DEVICE, dtype=torch.float64)[::2]
    check_against_reference(backend, x, weight, bias, [1, 1], [1, 2], [1, 1], "relu6")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batch(backend):
    x = random_x((0, 8, 15, 17), layout="channels_last")
    weight, bias = random_weights(8, 3, 3)
    out = ops.dwconv_bn_act(x, weight, bias, stride=2, backend=backend)
    assert out.shape == (0, 8, 8, 9) and out.dtype == x.dtype and out.device == x.device


# ------------------------------------------------------------------------------- registration and compile
def _op_args(layout, dtype=torch.float32):
    x = random_x((2, 8, 9, 10), dtype, layout)
    weight, bias = random_weights(8, 3, 3)
    return (x, weight, bias, [2, 1], [1, 1], [1, 1], "hardswish")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_opcheck_public_op(backend, layout):
    torch.library.opcheck(torch.ops.mbkernels.dwconv_bn_act, (*_op_args(layout), backend))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_cuda_op(layout):
    if backend_unavailable("cuda"):
        pytest.skip(f"cuda backend unavailable: {backend_unavailable('cuda')}")
    x, weight, bias, stride, padding, dilation, activation = _op_args(layout, torch.float16)
    torch.library.opcheck(torch.ops.mbkernels.dwconv_bn_act_cuda,
                          (x, weight, bias, stride, padding * 2, dilation, activation))


class TwoDepthwiseLayers(nn.Module):
    """A DWConvBNAct, then a direct call of the op with weights held by the module."""

    def __init__(self, channels: int, backend):
        super().__init__()
        self.first = DWConvBNAct(depthwise_conv(channels, 3), random_bn(channels), nn.Hardswish(), backend)
        self.weight = nn.Parameter(torch.randn(channels, 1, 5, 5) / 5, requires_grad=False)
        self.bias = nn.Parameter(torch.randn(channels) * 0.5, requires_grad=False)
        self.backend = backend

    def forward(self, x):
        return ops.dwconv_bn_act(self.first(x), self.weight, self.bias, stride=2, activation="relu",
                                 backend=self.backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compile_fullgraph(backend, poisoned_outputs):
    model = TwoDepthwiseLayers(16, backend).to(DEVICE).eval()
    x = random_x((2, 16, 15, 17), layout="channels_last")
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if HAS_GPU else "aot_eager")
    with torch.no_grad():
        got, want = compiled(x), model(x)
    assert_close_to_reference(got, want.double(), torch.float32)
    assert got.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------- DWConvBNAct
def _stock_and_fused(channels=24, kernel_size=5, stride=2, activation="silu", backend=None):
    conv = depthwise_conv(channels, kernel_size, stride, bias=True)
    stock = nn.Sequential(conv, random_bn(channels), stock_activation(activation)).to(DEVICE).eval()
    fused = DWConvBNAct(*copy.deepcopy(stock), backend=backend).eval()
    return stock, fused


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_module_eval_matches_stock_modules(backend, poisoned_outputs):
    stock, fused = _stock_and_fused(backend=backend)
    x = random_x((2, 24, 15, 17), layout="channels_last")
    with torch.no_grad():
        got, want = fused(x), stock.double()(x.double())
    assert_close_to_reference(got, want, torch.float32)


def test_module_train_mode_runs_the_stock_modules():
    stock, fused = _stock_and_fused()
    stock.train(), fused.train()
    x = random_x((4, 24, 15, 17))
    assert not fused.uses_fused_kernel(x)
    got, want = fused(x), stock(x)
    assert torch.equal(got, want)
    assert torch.equal(fused.bn.running_mean, stock[1].running_mean)
    assert torch.equal(fused.bn.running_var, stock[1].running_var)
    assert fused.bn.num_batches_tracked.item() == 1
    got.sum().backward()  # gradients flow through the stock modules
    assert fused.conv.weight.grad is not None


def test_module_uses_fused_kernel_only_without_autograd():
    _, fused = _stock_and_fused()
    x = random_x((1, 24, 15, 17))
    assert not fused.uses_fused_kernel(x)  # parameters require grad
    with torch.no_grad():
        assert fused.uses_fused_kernel(x)
    with torch.inference_mode():
        assert fused.uses_fused_kernel(x)


def _assert_fused_matches(fused, stock, x):
    with torch.no_grad():
        got, want = fused(x), copy.deepcopy(stock).double()(x.double())
    assert_close_to_reference(got, want, x.dtype)


def test_module_refolds_after_load_state_dict():
    stock, fused = _stock_and_fused()
    x = random_x((2, 24, 15, 17))
    _assert_fused_matches(fused, stock, x)
    other_stock, other_fused = _stock_and_fused()
    fused.load_state_dict(other_fused.state_dict())
    _assert_fused_matches(fused, other_stock, x)


def test_module_refolds_after_in_place_edits():
    stock, fused = _stock_and_fused()
    x = random_x((2, 24, 15, 17))
    _assert_fused_matches(fused, stock, x)
    with torch.no_grad():
        for module in (stock, nn.Sequential(fused.conv, fused.bn)):
            module[1].running_mean.add_(0.75)
            module[1].weight.mul_(-1.5)
            module[0].weight[3].zero_()
    _assert_fused_matches(fused, stock, x)


def test_module_refolds_after_dtype_change():
    stock, fused = _stock_and_fused()
    x = random_x((2, 24, 15, 17))
    _assert_fused_matches(fused, stock, x)
    folded_before = fused.folded_weights()[0]
    fused.to(torch.float16)
    stock.to(torch.float16)  # the reference then sees the same float16-rounded parameters
    folded_after = fused.folded_weights()[0]
    assert folded_after.dtype == torch.float32 and not torch.equal(folded_after, folded_before)
    _assert_fused_matches(fused, stock, x.half())


def test_module_rejects_non_depthwise_conv():
    with pytest.raises(ValueError, match="conv is not depthwise: groups=4"):
        DWConvBNAct(nn.Conv2d(8, 8, 3, groups=4), random_bn(8))
    with pytest.raises(ValueError, match="conv is not depthwise: groups=4, in_channels=8, out_channels=12"):
        DWConvBNAct(nn.Conv2d(8, 12, 3, groups=4), random_bn(12))


def test_module_rejects_bn_without_running_stats():
    with pytest.raises(ValueError, match="no running statistics"):
        DWConvBNAct(depthwise_conv(8, 3), nn.BatchNorm2d(8, track_running_stats=False))


def test_module_rejects_unsupported_activation():
    with pytest.raises(ValueError, match="activation Mish has no fused kernel"):
        DWConvBNAct(depthwise_conv(8, 3), random_bn(8), nn.Mish())


# ------------------------------------------------------------------------------------------- bad input
def _good_args():
    x = random_x((2, 8, 9, 10))
    weight, bias = random_weights(8, 3, 3)
    return dict(x=x, weight=weight, bias=bias, stride=1, padding=1, dilation=1, activation="relu")


BAD_INPUT = {
    "x_rank": (lambda a: dict(a, x=a["x"][0]), ValueError, r"x must be a 4-D \[N, C, H, W\] tensor, got shape \(8"),
    "x_integer": (lambda a: dict(a, x=a["x"].to(torch.int32)), ValueError, "x must be float32, float16 or bfloat16"),
    "x_float64": (lambda a: dict(a, x=a["x"].double()), ValueError, "x must be float32, float16 or bfloat16"),
    "weight_rank": (lambda a: dict(a, weight=a["weight"][:, 0]), ValueError, "weight must be a 4-D tensor"),
    "weight_channels": (lambda a: dict(a, weight=torch.randn(9, 1, 3, 3, device=DEVICE)), ValueError,
                        r"weight must be \[C \* M, 1, kh, kw\] with C = 8"),
    "weight_not_depthwise": (lambda a: dict(a, weight=torch.randn(8, 2, 3, 3, device=DEVICE)), ValueError,
                             "weight must be .* depthwise"),
    "weight_integer": (lambda a: dict(a, weight=a["weight"].to(torch.int64)), ValueError,
                       "weight must be a floating-point tensor"),
    "bias_size": (lambda a: dict(a, bias=a["bias"][:7]), ValueError, r"bias must be \[C \* M\] = \[8\], got \(7,\)"),
    "bias_rank": (lambda a: dict(a, bias=a["bias"][None]), ValueError, "bias must be a 1-D tensor"),
    "weight_other_device": (lambda a: dict(a, weight=a["weight"].to("meta")), ValueError, "weight is on meta"),
    "bias_other_device": (lambda a: dict(a, bias=a["bias"].to("meta")), ValueError, "bias is on meta"),
    "activation": (lambda a: dict(a, activation="mish"), ValueError, "unknown activation 'mish'"),
    "negative_padding": (lambda a: dict(a, padding=(1, -1)), ValueError, r"padding must be two ints >= 0"),
    "zero_stride": (lambda a: dict(a, stride=0), ValueError, r"stride must be two ints >= 1"),
    "zero_dilation": (lambda a: dict(a, dilation=(0, 1)), ValueError, r"dilation must be two ints >= 1"),
    "stride_triple": (lambda a: dict(a, stride=(1, 1, 1)), ValueError, "stride must be an int or a pair"),
    "kernel_bigger_than_padded_input": (
        lambda a: dict(a, x=a["x"][:, :, :2, :3], weight=torch.randn(8, 1, 5, 5, device=DEVICE), padding=1),
        ValueError, r"kernel \(5, 5\) .* does not fit x's 2x3 plane padded by \[1, 1\]"),
    "backend": (lambda a: dict(a, backend="cudnn"), ValueError, "unknown backend 'cudnn'"),
}


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_raises_naming_the_argument(name):
    make_bad, error, message = BAD_INPUT[name]
    with pytest.raises(error, match=message):
        ops.dwconv_bn_act(**make_bad(_good_args()))


def test_bad_input_raises_under_compile():
    """The fake kernel checks the arguments too, so a traced call fails as clearly as an eager one."""
    args = _good_args()

    def run(x):
        return ops.dwconv_bn_act(x, args["weight"][:, :, :2], args["bias"][:7], activation="relu")

    with pytest.raises(Exception, match=r"bias must be \[C \* M\] = \[8\]"):
        torch.compile(run, fullgraph=True, backend="eager")(args["x"])


# ------------------------------------------------------------------------------------- choice of backend
def test_environment_variable_picks_the_backend(monkeypatch):
    args = tuple(_op_args("nchw"))
    args = normalised_args(args)
    for backend in declared_backends():
        if not mbkernels.backend_status()[backend.name].available:
            continue
        monkeypatch.setenv(dispatch.ENV_VAR, backend.name)
        assert dispatch.select("dwconv_bn_act", None, args).backend is backend
    # The caller's explicit choice wins over the variable.
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    assert dispatch.select("dwconv_bn_act", "reference", args).run is reference.dwconv_bn_act


def test_environment_variable_reaches_the_op(monkeypatch):
    calls = []
    run_reference = reference.dwconv_bn_act

    def spy(args):
        calls.append(args.x.shape)
        return run_reference(args)

    monkeypatch.setitem(reference.BACKEND.ops, "dwconv_bn_act", OpSupport(spy))
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    ops.dwconv_bn_act(**_good_args())
    assert calls == [(2, 8, 9, 10)]


def test_unknown_backend_in_environment_raises(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match="unknown MBKERNELS_BACKEND 'cudnn'; expected one of cuda, triton, reference"):
        ops.dwconv_bn_act(**_good_args())


def test_backends_report_a_reason_for_each(monkeypatch):
    status = mbkernels.backend_status()
    assert list(status) == ["cuda", "triton", "reference"]
    assert status["reference"].available
    for name, (available, reason) in status.items():
        assert isinstance(reason, str) and reason, f"{name} gives no reason"
    monkeypatch.setattr(_native, "unavailable_reason", "mbkernels._C was not built (a test says so)")
    assert mbkernels.backend_status()["cuda"] == (False, "mbkernels._C was not built (a test says so)")
    if not HAS_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        available, reason = mbkernels.backend_status()["triton"]
        assert not available and "no CUDA GPU" in reason


def test_dispatch_failure_lists_every_backend(monkeypatch):
    switch_off_reference(monkeypatch)
    args = _good_args()
    args = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(RuntimeError, match="no backend can run dwconv_bn_act") as error:
        ops.dwconv_bn_act(**args)
    message = str(error.value)
    for name in ("cuda", "triton", "reference"):
        assert f"{name}: " in message
    assert "reference: switched off by a test" in message
    assert "cuda: " in message and "triton: " in message


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    switch_off_reference(monkeypatch)
    with pytest.raises(RuntimeError, match="the reference backend cannot run dwconv_bn_act here: switched off"):
        ops.dwconv_bn_act(**_good_args(), backend="reference")


def test_triton_serves_cpu_tensors_only_when_asked_by_name():
    from mbkernels.backends import triton

    if HAS_GPU:
        pytest.skip("the rule for CPU tensors under the interpreter; a GPU machine does not interpret")
    args = normalised_args(_op_args("nchw"))
    assert dispatch.why_not(triton.BACKEND, "dwconv_bn_act", args, explicit=True) is None
    assert "asked for by name" in dispatch.why_not(triton.BACKEND, "dwconv_bn_act", args, explicit=False)
    meta_args = args._replace(x=args.x.to("meta"))
    assert "x is on meta" in dispatch.why_not(triton.BACKEND, "dwconv_bn_act", meta_args, explicit=True)
    assert triton.interpreting()


def normalised_args(args):
    """The bundle a backend receives for these public-op arguments."""
    x, weight, bias, stride, padding, dilation, activation = args
    bundle = DWConvArgs(x, weight, bias, stride, _contract.padding4(padding), dilation, activation)
    return _contract.normalise_dwconv_bn_act(bundle)


def switch_off_reference(monkeypatch):
    support = reference.BACKEND.ops["dwconv_bn_act"]
    monkeypatch.setitem(reference.BACKEND.ops, "dwconv_bn_act",
                        OpSupport(support.run, lambda args: "switched off by a test"))


# ----------------------------------------------------------------------------------- the eager shortcut
def test_plain_eager_calls_skip_the_dispatcher_and_match_the_registered_op():
    """Plain eager calls run the op's implementation directly (cheaper at batch 1); the result is the op's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 6, 9, 11, device=DEVICE)
    weight, bias = torch.randn(6, 1, 3, 3, device=DEVICE), torch.randn(6, device=DEVICE)
    assert ops.plain_eager_call(x, weight, bias)
    assert not ops.plain_eager_call(x, weight.requires_grad_(), bias)  # autograd must meet the op (no backward)
    with torch.no_grad():
        assert ops.plain_eager_call(x, weight, bias)
    weight = weight.detach()
    with FakeTensorMode():
        assert not ops.plain_eager_call(torch.empty(1, 6, 3, 3))
    direct = ops.dwconv_bn_act(x, weight, bias, stride=2, activation="silu", backend="reference")
    registered = torch.ops.mbkernels.dwconv_bn_act(x, weight, bias, [2, 2], [1, 1], [1, 1], "silu", "reference")
    torch.testing.assert_close(direct, registered, rtol=0, atol=0)


def test_fused_module_leaves_inputs_the_op_does_not_take_to_the_stock_layers():
    """float64 input to a patched model: the stock layers run, as before patching."""
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6).double()
    bn = nn.BatchNorm2d(6).double()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    stock = nn.Sequential(conv, bn, nn.ReLU6()).eval()
    fused = mbkernels.nn.DWConvBNAct(conv, bn, nn.ReLU6()).eval()
    with torch.inference_mode():
        x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
        torch.testing.assert_close(fused(x), stock(x), rtol=0, atol=0)


def test_dispatch_falls_through_what_a_launcher_refuses(monkeypatch):
    """A backend's limit (the cuda launchers' are stated in C++) makes auto-dispatch pick the next backend."""
    args = normalised_args(_op_args("nchw"))
    cuda = mbkernels.backends.cuda.BACKEND
    refused = OpSupport(cuda.ops["dwconv_bn_act"].run, lambda args: "refused by a test")
    monkeypatch.setitem(cuda.ops, "dwconv_bn_act", refused)
    if backend_unavailable("cuda") is None:
        assert dispatch.why_not(cuda, "dwconv_bn_act", args, explicit=True) == "refused by a test"
    assert dispatch.select("dwconv_bn_act", None, args).run is not refused.run


def test_cuda_limits_come_from_the_launcher():
    if backend_unavailable("cuda"):
        pytest.skip(f"cuda backend unavailable: {backend_unavailable('cuda')}")
    args = normalised_args(_op_args("nchw"))
    assert mbkernels.backends.cuda.dwconv_bn_act_limit(args) is None
    # An NCHW tile for a 7x7 kernel dilated by 40 does not fit the launcher's shared memory: C++ says so.
    huge_halo = normalised_args((random_x((1, 8, 300, 300)), *random_weights(8, 7, 7), [1, 1], [120, 120], [40, 40],
                                 "relu"))
    reason = mbkernels.backends.cuda.dwconv_bn_act_limit(huge_halo)
    assert reason and "shared memory" in reason, reason
