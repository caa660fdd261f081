"""squeeze_excite: every backend against float64 references and the stock modules; the SqueezeExcite module."""
import copy

import pytest
import torch
from torch import nn

from mbkernels import dispatch, ops
from mbkernels._contract import SEArgs
from mbkernels.backends.triton import squeeze_excite as triton_se
from mbkernels.nn import SqueezeExcite
from models.forwards import ClampGate, PaddleHardSigmoid
from models.mobilenetv3 import h_sigmoid, make_divisible
from oracle import se64
from conftest import ALL_BACKENDS, DEVICE, KERNEL_BACKENDS, TOLERANCE, assert_close_to_reference, backend_unavailable

timm_blocks = pytest.importorskip("timm.models._efficientnet_blocks")
timm_layers = pytest.importorskip("timm.layers")
torchvision_misc = pytest.importorskip("torchvision.ops.misc")



# ------------------------------------------------------------------------------------------------ inputs
def make_x(n, c, h, w, dtype=torch.float32, channels_last=False, seed=0):
    """Random planes with a per-(sample, channel) offset, so that the means (and so the gate) differ by channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g) + torch.randn(n, c, 1, 1, generator=g)
    x = x.to(device=DEVICE, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def make_weights(c, r, bias=True, seed=1):
    """Scaled so that the gate's input spans its linear part and both saturated ends (hardsigmoid: |v| > 3)."""
    g = torch.Generator().manual_seed(seed)
    w_reduce = torch.randn(r, c, generator=g) * (2 / c**0.5)
    w_expand = torch.randn(c, r, generator=g) * (2 / r**0.5)
    b_reduce = torch.randn(r, generator=g) * 0.5 if bias else None
    b_expand = torch.randn(c, generator=g) if bias else None
    return [None if t is None else t.to(DEVICE) for t in (w_reduce, b_reduce, w_expand, b_expand)]


def reference64(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate):
    return se64(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate)


@pytest.fixture
def backend(request):
    return request.param


# --------------------------------------------------------------------------- kernels against float64
# A covering set rather than the cartesian product: every C/plane class appears with both layouts, all dtypes,
# both activations and gates, with and without biases. N=64 only with small planes (the interpreter is slow).
#        N     C    R    H    W  channels_last dtype           activation gate          bias
CASES = [
    (1, 16, 8, 112, 112, False, torch.float32, "relu", "hardsigmoid", True),  # big plane: pooling splits
    (1, 16, 8, 112, 112, True, torch.bfloat16, "silu", "sigmoid", False),
    (3, 72, 24, 28, 28, False, torch.float16, "relu", "hardsigmoid", True),
    (5, 120, 31, 14, 14, True, torch.float32, "relu", "sigmoid", True),
    (4, 200, 143, 9, 11, True, torch.float16, "silu", "hardsigmoid", False),
    (2, 960, 240, 7, 7, True, torch.float16, "relu", "hardsigmoid", True),
    (1, 1152, 47, 7, 7, False, torch.float32, "silu", "sigmoid", True),
    (2, 1280, 321, 7, 7, False, torch.bfloat16, "silu", "sigmoid", True),
    (2, 24, 1, 3, 5, False, torch.bfloat16, "silu", "hardsigmoid", True),  # R = 1, odd plane
    (1, 8, 8, 56, 56, True, torch.float32, "relu", "hardsigmoid", True),  # R = C
    (64, 40, 9, 7, 7, True, torch.float32, "silu", "sigmoid", True),
    (64, 16, 5, 14, 14, False, torch.bfloat16, "relu", "hardsigmoid", False),
    (64, 8, 3, 1, 1, False, torch.float16, "relu", "sigmoid", True),  # H*W = 1
    (64, 1280, 3, 1, 1, True, torch.float32, "silu", "hardsigmoid", True),
]


def _case_id(case):
    n, c, r, h, w, channels_last, dtype, activation, gate, bias = case
    layout = "nhwc" if channels_last else "nchw"
    return f"{n}x{c}x{h}x{w}-R{r}-{layout}-{str(dtype)[6:]}-{activation}-{gate}{'' if bias else '-nobias'}"


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_float64_reference(backend, case, poisoned_outputs):
    n, c, r, h, w, channels_last, dtype, activation, gate, bias = case
    x = make_x(n, c, h, w, dtype, channels_last)
    weights = make_weights(c, r, bias)
    inputs_before = [t.clone() for t in (x, *weights) if t is not None]
    out = ops.squeeze_excite(x, *weights, activation=activation, gate=gate, backend=backend)
    assert_close_to_reference(out, reference64(x, *weights, activation, gate), dtype)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for before, after in zip(inputs_before, [t for t in (x, *weights) if t is not None]):
        assert torch.equal(before, after), "an input was modified"


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_weights_of_1x1_convs_and_other_dtypes(backend):
    """[R, C, 1, 1] conv weights and float16 weights are accepted; the MLP still runs in float32."""
    x = make_x(2, 24, 5, 5)
    w_reduce, b_reduce, w_expand, b_expand = make_weights(24, 6)
    out = ops.squeeze_excite(x, w_reduce.half()[:, :, None, None], b_reduce.half(), w_expand.half()[:, :, None, None],
                             b_expand.half(), backend=backend)
    weights = [t.half() for t in (w_reduce, b_reduce, w_expand, b_expand)]
    assert_close_to_reference(out, reference64(x, *weights, "relu", "hardsigmoid"), torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
@pytest.mark.parametrize("shape, channels_last", [((1, 16, 112, 112), False), ((1, 16, 112, 112), True),
                                                   ((64, 40, 7, 7), True)])
def test_repeated_calls_give_identical_bits(backend, shape, channels_last):
    x = make_x(*shape, dtype=torch.float32, channels_last=channels_last)
    weights = make_weights(shape[1], 7)
    first = ops.squeeze_excite(x, *weights, activation="silu", gate="sigmoid", backend=backend)
    second = ops.squeeze_excite(x, *weights, activation="silu", gate="sigmoid", backend=backend)
    assert torch.equal(first, second)


def test_int64_offsets(monkeypatch):
    """The int64 offsets that inputs of 2**31 elements or more take, on a small input."""
    monkeypatch.setattr(triton_se, "INT32_LIMIT", 0)
    x = make_x(3, 20, 9, 7, channels_last=True)
    weights = make_weights(20, 5)
    out = triton_se.launch(SEArgs(x, *weights, "silu", "sigmoid"))
    assert_close_to_reference(out, reference64(x, *weights, "silu", "sigmoid"), torch.float32)


def test_big_planes_pool_over_several_programs():
    """The split-plane path (partial sums added in a fixed order) is the one the tests above run."""
    _, block_c, block_p = triton_se._tile(1, 16, 112 * 112, False)
    sample_blocks, channel_blocks = 1, triton_se.triton.cdiv(16, block_c)
    _, splits = triton_se._pool_splits(sample_blocks, channel_blocks, 112 * 112, block_p, DEVICE, None)
    assert splits > 1


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_empty_batch_and_single_pixel(backend, channels_last):
    weights = make_weights(12, 5)
    empty = make_x(0, 12, 4, 4, channels_last=channels_last)
    out = ops.squeeze_excite(empty, *weights, backend=backend)
    assert out.shape == empty.shape and out.dtype == empty.dtype
    single = make_x(3, 12, 1, 1, dtype=torch.float16, channels_last=channels_last)
    out = ops.squeeze_excite(single, *weights, backend=backend)
    assert_close_to_reference(out, reference64(single, *weights, "relu", "hardsigmoid"), torch.float16)


# ------------------------------------------------------------------------------------------ bad inputs
def _bad_inputs():
    x = make_x(2, 12, 4, 4)
    w_reduce, b_reduce, w_expand, b_expand = make_weights(12, 5)
    good = dict(x=x, w_reduce=w_reduce, b_reduce=b_reduce, w_expand=w_expand, b_expand=b_expand)
    return [
        ("x-channels", dict(good, x=make_x(2, 13, 4, 4)), r"w_reduce must be \[5, 13\]"),
        ("R-mismatch", dict(good, w_expand=torch.randn(12, 6, device=DEVICE)), r"w_expand must be \[12, 5\]"),
        ("b_reduce-size", dict(good, b_reduce=torch.randn(4, device=DEVICE)), r"b_reduce must be \[5\]"),
        ("b_expand-size", dict(good, b_expand=torch.randn(13, device=DEVICE)), r"b_expand must be \[12\]"),
        ("w_reduce-3d", dict(good, w_reduce=w_reduce[None]), "w_reduce must be"),
        ("x-float64", dict(good, x=x.double()), "x must be float32, float16 or bfloat16"),
        ("x-int", dict(good, x=x.to(torch.int32)), "x must be float32, float16 or bfloat16"),
        ("x-3d", dict(good, x=x[0]), "x must be a 4-D"),
        ("w_expand-int", dict(good, w_expand=w_expand.to(torch.int64)), "w_expand must be a floating-point"),
        ("w_expand-device", dict(good, w_expand=w_expand.to("meta")), "w_expand is on meta"),
        ("b_reduce-device", dict(good, b_reduce=b_reduce.to("meta")), "b_reduce is on meta"),
        ("activation", dict(good, activation="mish"), "activation 'mish'"),
        ("gate", dict(good, gate="tanh"), "gate 'tanh'"),
        ("backend", dict(good, backend="opencl"), "backend 'opencl'"),
    ]


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("name, kwargs, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.squeeze_excite(**kwargs)


def test_triton_backend_declines_what_it_cannot_run():
    x = make_x(2, 12, 4, 4)
    weights = make_weights(12, 5)
    # CPU tensors: never picked automatically (the interpreter is for tests), nor at all without it.
    from mbkernels.backends import triton

    cpu_args = SEArgs(x.cpu(), *[w.cpu() if w is not None else None for w in weights], "relu", "sigmoid")
    assert dispatch.why_not(triton.BACKEND, "squeeze_excite", cpu_args, explicit=False)
    reduced = triton_se.MAX_REDUCED_CHANNELS + 1
    too_wide = SEArgs(x, torch.randn(reduced, 12), None, torch.randn(12, reduced), None, "relu", "sigmoid")
    assert "reduced channels" in triton.BACKEND.ops["squeeze_excite"].limit(too_wide)


# ------------------------------------------------------------------------------------- stock modules
class LinearSE(nn.Module):
    """Hand-written: pool, view, Linear, ReLU, Linear, Hardsigmoid, multiply."""

    def __init__(self, channels, reduction=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(channels // reduction, channels)
        self.hsigmoid = nn.Hardsigmoid()

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.hsigmoid(self.fc2(self.relu(self.fc1(y))))
        return x * y.view(b, c, 1, 1)


class SequentialSE(nn.Module):
    """Hand-written with the Linears in an nn.Sequential `fc`, a hand-written h_sigmoid and make_divisible."""

    def __init__(self, channel, reduction=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, make_divisible(channel // reduction, 8)),
            nn.ReLU(inplace=True),
            nn.Linear(make_divisible(channel // reduction, 8), channel),
            h_sigmoid(),
        )

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y


class FlattenSE(nn.Module):
    """Older hand-written code: its own parameter-free Flatten module, 1x1 convs on the pooled vector, Dropout."""

    class Flatten(nn.Module):
        def forward(self, x):
            return x.view(x.size(0), -1)

    def __init__(self, channels):
        super().__init__()
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), self.Flatten(), nn.Dropout(0.2))
        self.fc1, self.act, self.fc2 = nn.Linear(channels, channels // 4, bias=False), nn.SiLU(), nn.Linear(
            channels // 4, channels)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        y = self.gate(self.fc2(self.act(self.fc1(self.squeeze(x)))))
        return x * y[:, :, None, None]


class PaddleSE(nn.Module):
    """PaddlePaddle's SE as its ports write it: 1x1 convs and a hard sigmoid of slope 0.2."""

    def __init__(self, channels):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv1, self.conv2 = nn.Conv2d(channels, channels // 4, 1), nn.Conv2d(channels // 4, channels, 1)
        self.relu = nn.ReLU()
        self.hardsigmoid = PaddleHardSigmoid()

    def forward(self, x):
        return x * self.hardsigmoid(self.conv2(self.relu(self.conv1(self.avg_pool(x)))))


class InPlaceSE(SequentialSE):
    """Scales the caller's x in place; the fused module must not."""

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)
        x *= y
        return x


def _randomise(module):
    """Stock initialisations leave biases small; random ones make the gate's saturation matter."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


SOURCES = {
    "timm-efficientnet": (lambda: timm_blocks.SqueezeExcite(40, rd_ratio=0.25, act_layer=nn.SiLU), "silu", "sigmoid"),
    "timm-mobilenetv3": (lambda: timm_blocks.SqueezeExcite(72, rd_ratio=0.25, act_layer=nn.ReLU,
                                                           gate_layer="hard_sigmoid"), "relu", "hardsigmoid"),
    "timm-semodule": (lambda: timm_layers.SEModule(64, rd_ratio=1 / 8), "relu", "sigmoid"),
    "torchvision": (lambda: torchvision_misc.SqueezeExcitation(96, 24, scale_activation=nn.Hardsigmoid),
                    "relu", "hardsigmoid"),
    "torchvision-silu": (lambda: torchvision_misc.SqueezeExcitation(48, 13, activation=nn.SiLU), "silu", "sigmoid"),
    "linear": (lambda: LinearSE(40), "relu", "hardsigmoid"),
    "sequential-make-divisible": (lambda: SequentialSE(72), "relu", "hardsigmoid"),
    "in-place": (lambda: InPlaceSE(24), "relu", "hardsigmoid"),
    "flatten-dropout-no-bias": (lambda: FlattenSE(32), "silu", "sigmoid"),
    # Gates of an affine map of their input, folded into the expand layer.
    "clamp-gate": (lambda: timm_blocks.SqueezeExcite(40, rd_ratio=0.25, gate_layer=ClampGate), "relu",
                   "hardsigmoid:6,-3"),
    "paddle-gate": (lambda: PaddleSE(32), "relu", "hardsigmoid:1.2,0"),
    "one-layer-clamp-gate": (lambda: timm_layers.EffectiveSEModule(24, gate_layer=ClampGate), "identity",
                             "hardsigmoid:6,-3"),
}


def stock64(module, x):
    """A float64 copy of the stock module, run on x in float64."""
    with torch.no_grad():
        return copy.deepcopy(module).double()(x.double())


def _channels(module):
    return next(p for p in module.parameters() if p.dim() >= 2).shape[1]


@pytest.mark.parametrize("source", SOURCES)
def test_reference_backend_matches_stock_module_in_float64(source):
    make, activation, gate = SOURCES[source]
    stock = _randomise(make()).eval().to(DEVICE)
    fused = SqueezeExcite.from_module(stock, backend="reference")
    assert (fused.activation, fused.gate) == (activation, gate)
    x = make_x(3, _channels(stock), 6, 5)
    with torch.no_grad():
        out = fused(x)
    assert_close_to_reference(out, stock64(stock, x), torch.float32)


@pytest.mark.parametrize("source", SOURCES)
def test_from_module_keeps_the_stock_module(source, op_calls):
    make, activation, gate = SOURCES[source]
    stock = _randomise(make()).to(DEVICE)
    fused = SqueezeExcite.from_module(stock)
    assert fused.stock is stock
    assert fused.state_dict().keys() == stock.state_dict().keys()
    for key, value in stock.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value)
    assert "fused=True" in repr(fused) and f"gate={gate!r}" in repr(fused)

    x = make_x(2, _channels(stock), 7, 3)
    x_before = x.clone()
    # Training, or gradients wanted: the stock module runs (on a copy when it writes into its input).
    fused.train()
    torch.manual_seed(3)  # the same dropout masks, where there is dropout
    trained = fused(x)
    torch.manual_seed(3)
    assert torch.equal(trained, stock(x.clone()))
    x_grad = x.clone().requires_grad_()
    fused.eval()(x_grad).sum().backward()
    assert x_grad.grad is not None
    assert torch.equal(x, x_before)

    # Inference: one call of the fused op, close to the stock module.
    op_calls.clear()  # from_module's probe ran the op too
    with torch.no_grad():
        out = fused(x)
        want = stock(x.clone())
    assert [op for op, _ in op_calls] == ["squeeze_excite"]
    assert_close_to_reference(out, want.double(), torch.float32)
    assert torch.equal(x, x_before), "the fused module modified its input"


def test_checkpoints_load_both_ways_and_refresh_the_cached_weights():
    stock = SequentialSE(40).eval().to(DEVICE)
    fused = SqueezeExcite.from_module(stock)
    other = _randomise(SequentialSE(40)).eval().to(DEVICE)
    x = make_x(2, 40, 5, 5)
    with torch.no_grad():
        before = fused(x)
        fused.load_state_dict(other.state_dict())  # a stock checkpoint into the fused module
        after = fused(x)
        assert not torch.equal(before, after)
        assert_close_to_reference(after, stock64(other, x), torch.float32)
        model = nn.Sequential(nn.Identity(), SqueezeExcite.from_module(SequentialSE(40))).to(DEVICE)
        model.load_state_dict(nn.Sequential(nn.Identity(), other).state_dict())  # nested, strict
        assert torch.equal(model[1].stock.fc[2].weight, other.fc[2].weight)
        stock.load_state_dict(fused.state_dict())  # and back
        assert torch.equal(stock.fc[0].weight, other.fc[0].weight)
        stock.fc[2].bias.add_(1.0)  # an in-place edit of a parameter refreshes the cache
        assert_close_to_reference(fused(x), stock64(stock, x), torch.float32)
        half = SqueezeExcite.from_module(_randomise(LinearSE(40)).eval()).to(DEVICE).half()  # float32 MLP inside
        assert_close_to_reference(half(x.half()), stock64(half.stock, x.half()), torch.float16)


class NotAnSE(nn.Module):
    """SE layers, but the forward adds a residual: the numeric check must refuse it."""

    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, 8), nn.ReLU(), nn.Linear(8, channels), nn.Sigmoid())

    def forward(self, x):
        return x + x * self.fc(x.mean((2, 3)))[:, :, None, None]


@pytest.mark.parametrize("module, message", [
    (nn.Conv2d(8, 8, 3), "Conv2d is not a squeeze-excite module"),
    (nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU()), r"found 0 \(Conv2d\), 1 \(BatchNorm2d\), 2"),
    (nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 1)), "expected two linear or 1x1 conv layers"),
    (nn.Sequential(nn.Conv2d(8, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 1), nn.Sigmoid()), "only an nn.Linear or a 1x1"),
    (nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Sigmoid()), "an SE's layers map C -> R -> C"),
    (torchvision_misc.SqueezeExcitation(16, 4, activation=nn.Tanh), r"activation \(Tanh\) computes no known function"),
    (timm_layers.SEModule(32, add_maxpool=True), "does not compute one"),
    (NotAnSE(16), "does not compute one: fused output differs from stock on a probe"),
], ids=["conv", "conv-bn-relu", "no-gate", "3x3", "shapes", "tanh", "maxpool", "residual"])
def test_from_module_refuses_what_is_not_an_se(module, message):
    with pytest.raises(ValueError, match=message):
        SqueezeExcite.from_module(module)


# ---------------------------------------------------------------------------------- opcheck, compile
def _opcheck_args(*extra):
    x = make_x(2, 12, 5, 3, channels_last=True)
    return (x, *make_weights(12, 5)[:3], None, "silu", "hardsigmoid", *extra)


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_opcheck_public_op(backend):
    torch.library.opcheck(torch.ops.mbkernels.squeeze_excite.default, _opcheck_args(backend))


def test_opcheck_cuda_op():
    if backend_unavailable("cuda"):
        pytest.skip(f"cuda backend unavailable: {backend_unavailable('cuda')}")
    torch.library.opcheck(torch.ops.mbkernels.squeeze_excite_cuda.default, _opcheck_args())


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_compiled_module_fullgraph(backend):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(16, 16, 1), SqueezeExcite.from_module(SequentialSE(16)), nn.ReLU()).eval()
    model[1].backend = backend
    model = model.to(DEVICE)
    x = make_x(2, 16, 6, 6, channels_last=True)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=TOLERANCE[torch.float32], atol=TOLERANCE[torch.float32])

