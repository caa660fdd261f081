"""inverted_residual: whole blocks (expand -> depthwise -> [SE] -> project [+ x]) against float64 references.

The fused module is held to the stock blocks themselves (timm InvertedResidual / DepthwiseSeparableConv,
torchvision InvertedResidual of MobileNetV2 and V3, MBConv, the hand-written MobileNetV3 blocks), run in float64
with random BatchNorm statistics; the op to a float64 composition of stock functions (tests/oracle.py) over odd
shapes, layouts and dtypes, with poisoned outputs. Then opcheck, torch.compile, the module's state, bad input and
the Triton launcher's limits and GPU tiles.
"""
import copy
import zlib
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ALL_BACKENDS, DEVICE, HAS_GPU, TOLERANCE, assert_close_to_reference
from models import mobilenetv3 as handwritten
from models.forwards import ClampGate
from oracle import as64, dwconv64, se64, stock_activation
from mbkernels import dispatch, ops
from mbkernels._contract import BlockArgs, normalise_inverted_residual
from mbkernels.backends import get as get_backend
from mbkernels.backends.triton import inverted_residual as triton_block
from mbkernels.nn import InvertedResidual
from mbkernels.match import randomize_batchnorm
from mbkernels.planner import cost

timm_blocks = pytest.importorskip("timm.models._efficientnet_blocks")
tv_mobilenetv2 = pytest.importorskip("torchvision.models.mobilenetv2")
tv_mobilenetv3 = pytest.importorskip("torchvision.models.mobilenetv3")
tv_efficientnet = pytest.importorskip("torchvision.models.efficientnet")

TRITON_AND_REFERENCE = [p for p in ALL_BACKENDS if p.id != "cuda"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random data in every test, the same on every run of that test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def random_x(shape, dtype=torch.float32, channels_last=False):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def stock64(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(block).cpu().double().eval()(x.detach().cpu().double())


# ------------------------------------------------------------------------------------------ stock blocks
def _tv_v3(inp, k, exp, out, se, act, stride):
    config = tv_mobilenetv3.InvertedResidualConfig(inp, k, exp, out, se, act, stride, 1, 1.0)
    return tv_mobilenetv3.InvertedResidual(config, partial(nn.BatchNorm2d, eps=0.001, momentum=0.01))


def _tv_mbconv(expand_ratio, k, stride, inp, out):
    config = tv_efficientnet.MBConvConfig(expand_ratio, k, stride, inp, out, 1, 1.0)
    return tv_efficientnet.MBConv(config, 0.2, nn.BatchNorm2d)


def _timm_se(**kwargs):
    return partial(timm_blocks.SqueezeExcite, **kwargs)


# name: (build, input channels, plane); every block is built in eval mode with random BN statistics.
BLOCKS = {
    "timm-ir-k3s1-res": (lambda: timm_blocks.InvertedResidual(24, 24, 3, 1, exp_ratio=3.0), 24, (11, 9)),
    "timm-ir-k5s2-se-hswish": (lambda: timm_blocks.InvertedResidual(
        24, 40, 5, 2, exp_ratio=3.0, act_layer=nn.Hardswish,
        se_layer=_timm_se(gate_layer="hard_sigmoid", rd_round_fn=handwritten.make_divisible)), 24, (13, 10)),
    "timm-ir-silu-se-res": (lambda: timm_blocks.InvertedResidual(
        40, 40, 5, 1, exp_ratio=6.0, act_layer=nn.SiLU, se_layer=_timm_se(rd_ratio=0.25 / 6)), 40, (7, 7)),
    "timm-ir-se-clamp-gate": (lambda: timm_blocks.InvertedResidual(
        24, 24, 3, 1, exp_ratio=3.0, se_layer=_timm_se(gate_layer=ClampGate)), 24, (9, 7)),
    "timm-ir-dilated": (lambda: timm_blocks.InvertedResidual(16, 16, 3, 1, dilation=2, exp_ratio=2.0), 16, (9, 12)),
    "timm-dsconv-res": (lambda: timm_blocks.DepthwiseSeparableConv(16, 16, 3, 1), 16, (15, 13)),
    "timm-dsconv-se-s2": (lambda: timm_blocks.DepthwiseSeparableConv(
        16, 24, 3, 2, act_layer=nn.SiLU, se_layer=_timm_se(rd_ratio=0.25)), 16, (10, 11)),
    "tv-v2-res": (lambda: tv_mobilenetv2.InvertedResidual(24, 24, 1, 6), 24, (9, 9)),
    "tv-v2-first": (lambda: tv_mobilenetv2.InvertedResidual(32, 16, 1, 1), 32, (12, 7)),
    "tv-v3-se-s2": (lambda: _tv_v3(24, 5, 72, 40, True, "RE", 2), 24, (11, 11)),
    "tv-v3-hs-res": (lambda: _tv_v3(40, 3, 120, 40, False, "HS", 1), 40, (8, 6)),
    "tv-v3-first": (lambda: _tv_v3(16, 3, 16, 16, False, "RE", 1), 16, (9, 8)),
    "tv-mbconv-res": (lambda: _tv_mbconv(6, 3, 1, 24, 24), 24, (7, 9)),
    "tv-mbconv-k5s2": (lambda: _tv_mbconv(6, 5, 2, 16, 24), 16, (12, 11)),
    "hand-se-act-after": (lambda: handwritten.InvertedResidual(24, 72, 24, 5, 1, True, False), 24, (9, 10)),
    "hand-hs-s2": (lambda: handwritten.InvertedResidual(24, 96, 40, 3, 2, False, True), 24, (11, 8)),
    "hand-first-se": (lambda: handwritten.InvertedResidual(16, 16, 16, 3, 2, True, False), 16, (10, 10)),
    "hand-odd-channels": (lambda: handwritten.InvertedResidual(13, 37, 13, 3, 1, True, True), 13, (7, 9)),
}


def stock_block(name: str) -> nn.Module:
    build, _, _ = BLOCKS[name]
    return randomize_batchnorm(build().eval(), torch.Generator().manual_seed(zlib.crc32(name.encode())))


# (block, dtype, channels_last): every block in float32 NCHW and one half-precision channels_last form.
MODULE_CASES = [(name, torch.float32, False) for name in BLOCKS] + [
    (name, DTYPES[1 + i % 2], True) for i, name in enumerate(BLOCKS)]


@pytest.mark.parametrize("backend", TRITON_AND_REFERENCE)
@pytest.mark.parametrize("name, dtype, channels_last", MODULE_CASES,
                         ids=[f"{n}-{str(d)[6:]}-{'nhwc' if cl else 'nchw'}" for n, d, cl in MODULE_CASES])
def test_module_matches_stock_block_in_float64(name, dtype, channels_last, backend, poisoned_outputs):
    _, channels, (height, width) = BLOCKS[name]
    block = stock_block(name).to(DEVICE)
    fused = InvertedResidual.from_module(block, backend=backend)
    x = random_x((2, channels, height, width), dtype, channels_last)
    with torch.no_grad():
        out = fused(x)
    assert_close_to_reference(out, stock64(block, x), dtype)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_the_match_reads_each_blocks_structure():
    """What from_module found, for blocks whose parts differ: no expand, SE, the activation after the SE."""
    parts = {name: InvertedResidual.from_module(stock_block(name)).parts for name in BLOCKS}
    assert parts["timm-dsconv-res"].expand_conv is None and parts["timm-dsconv-res"].residual
    assert parts["timm-ir-k5s2-se-hswish"].se_gate == "hardsigmoid" and not parts["timm-ir-k5s2-se-hswish"].residual
    assert parts["tv-v2-res"].dw_activation == "relu6" and parts["tv-v2-res"].residual
    assert parts["tv-v2-first"].expand_conv is None and not parts["tv-v2-first"].residual
    hand = parts["hand-se-act-after"]
    assert (hand.dw_activation, hand.post_se_activation, hand.residual) == ("identity", "relu", True)
    assert parts["hand-hs-s2"].dw_activation == "hardswish" and parts["hand-hs-s2"].se is None
    assert parts["tv-mbconv-res"].residual and parts["tv-mbconv-res"].se_activation == "silu"


# --------------------------------------------------------------------------------- the op against float64
def block64(x, w_expand, b_expand, expand_activation, w_dw, b_dw, stride, padding, dilation, dw_activation, se,
            se_activation, se_gate, post_se_activation, w_project, b_project, project_activation, residual):
    """The block in float64 on the CPU from stock functions (tests/oracle.py)."""
    h = as64(x).cpu()
    if w_expand is not None:
        h = stock_activation(expand_activation)(F.conv2d(h, as64(w_expand).cpu()[:, :, None, None],
                                                         as64(b_expand).cpu()))
    d = dwconv64(h, w_dw, b_dw, stride, padding, dilation, dw_activation)
    if se is not None:
        d = stock_activation(post_se_activation)(se64(d, *se, se_activation, se_gate))
    y = stock_activation(project_activation)(F.conv2d(d, as64(w_project).cpu()[:, :, None, None],
                                                      as64(b_project).cpu()))
    return y + as64(x).cpu() if residual else y


def random_block(c, e, o, k, se_reduced=None, expand=True, se_bias=True):
    """Folded float32 weights scaled so that every stage's output stays around 1."""
    weights = dict(w_dw=torch.randn(e, 1, *k) / (k[0] * k[1]) ** 0.5, b_dw=torch.randn(e) * 0.5,
                   w_project=torch.randn(o, e) / e ** 0.5, b_project=torch.randn(o) * 0.5)
    if expand:
        weights.update(w_expand=torch.randn(e, c) / c ** 0.5, b_expand=torch.randn(e) * 0.5)
    if se_reduced:
        weights["se"] = (torch.randn(se_reduced, e) * 2 / e ** 0.5, torch.randn(se_reduced) * 0.5 if se_bias else None,
                         torch.randn(e, se_reduced) * 2 / se_reduced ** 0.5, torch.randn(e) if se_bias else None)
    return {key: tuple(t if t is None else t.to(DEVICE) for t in v) if key == "se" else v.to(DEVICE)
            for key, v in weights.items()}


#  N   C   E   O   H   W   kernel  stride  padding        dil  SE  expand residual dtype          nhwc  activations
OP_CASES = [
    (2, 13, 37, 13, 9, 11, (3, 3), (1, 1), [1, 1], (1, 1), None, True, True, torch.float32, False, "relu"),
    (2, 13, 37, 19, 9, 11, (3, 3), (2, 2), [1, 1], (1, 1), 9, True, False, torch.float16, True, "hardswish"),
    (3, 24, 72, 24, 7, 13, (5, 5), (1, 1), [2, 2], (1, 1), 18, True, True, torch.bfloat16, True, "silu"),
    (1, 20, 20, 28, 15, 8, (5, 5), (2, 2), [1, 2, 2, 1], (1, 1), None, False, False, torch.float32, True, "relu6"),
    (2, 16, 16, 16, 10, 10, (3, 3), (1, 1), [1, 1], (1, 1), 4, False, True, torch.float16, False, "gelu"),
    (2, 8, 40, 8, 12, 9, (3, 3), (1, 1), [2, 2], (2, 2), None, True, True, torch.float32, True,
     "leaky_relu:0.2"),
    (1, 40, 240, 80, 14, 14, (3, 3), (2, 2), [1, 1], (1, 1), 60, True, False, torch.float16, True, "hardswish"),
    (2, 96, 576, 96, 7, 7, (5, 5), (1, 1), [2, 2], (1, 1), 144, True, True, torch.float32, False, "hardswish"),
    (2, 24, 48, 24, 1, 1, (3, 3), (1, 1), [1, 1], (1, 1), 12, True, True, torch.float16, True, "relu"),
]


def _op_case_id(case):
    n, c, e, o, h, w, k, s, p, d, se, expand, residual, dtype, nhwc, act = case
    return (f"{n}x{c}x{h}x{w}-E{e}-O{o}-k{k[0]}s{s[0]}" + (f"d{d[0]}" if d != (1, 1) else "")
            + f"-p{'.'.join(map(str, p))}"
            + (f"-se{se}" if se else "") + ("" if expand else "-noexpand") + ("-res" if residual else "")
            + f"-{str(dtype)[6:]}-{'nhwc' if nhwc else 'nchw'}-{act}")


@pytest.mark.parametrize("backend", TRITON_AND_REFERENCE)
@pytest.mark.parametrize("case", OP_CASES, ids=_op_case_id)
def test_op_matches_float64_reference(case, backend, poisoned_outputs):
    n, c, e, o, h, w, k, s, p, d, se, expand, residual, dtype, nhwc, act = case
    x = random_x((n, c, h, w), dtype, nhwc)
    weights = random_block(c, e, o, k, se, expand, se_bias=case[10] != 4)
    # The SE blocks of the hand-written models apply the activation after the SE: one case in three does so.
    post_se = act if se and n == 3 else "identity"
    settings = dict(expand_activation=act, stride=s, padding=p, dilation=d, dw_activation="identity" if post_se !=
                    "identity" else act, se_activation="relu", se_gate="hardsigmoid" if se and se % 2 else "sigmoid",
                    post_se_activation=post_se, project_activation="identity" if residual else act, residual=residual)
    before = x.clone()
    out = ops.inverted_residual(x, **weights, **settings, backend=backend)
    want = block64(x, weights.get("w_expand"), weights.get("b_expand"), settings["expand_activation"],
                   weights["w_dw"], weights["b_dw"], s, p, d, settings["dw_activation"], weights.get("se"),
                   "relu", settings["se_gate"], post_se, weights["w_project"], weights["b_project"],
                   settings["project_activation"], residual)
    assert_close_to_reference(out, want, dtype)
    assert out.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    assert torch.equal(x, before), "the op modified its input"


# ---------------------------------------------------------------------------------- opcheck, compile
def _opcheck_args(backend, se=True):
    x = random_x((2, 12, 7, 5), channels_last=True)
    w = random_block(12, 30, 12, (3, 3), 8 if se else None)
    se_weights = w["se"] if se else (None, None, None, None)
    return (x, w["w_expand"], w["b_expand"], "hardswish", w["w_dw"], w["b_dw"], [1, 1], [1, 1, 1, 1], [1, 1],
            "hardswish", *se_weights, "relu", "hardsigmoid", "identity", w["w_project"], w["b_project"], "identity",
            True, backend)


@pytest.mark.parametrize("se", [True, False], ids=["se", "no-se"])
@pytest.mark.parametrize("backend", TRITON_AND_REFERENCE)
def test_opcheck(backend, se):
    torch.library.opcheck(torch.ops.mbkernels.inverted_residual.default, _opcheck_args(backend, se))


@pytest.mark.parametrize("backend", TRITON_AND_REFERENCE)
def test_compiled_module_fullgraph(backend, poisoned_outputs):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(16, 24, 1), InvertedResidual.from_module(_hand_block(), backend),
                          nn.ReLU()).to(DEVICE).eval()
    x = random_x((2, 16, 9, 7), channels_last=True)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if HAS_GPU else "aot_eager")
    with torch.no_grad():
        got, want = compiled(x), model(x)
    torch.testing.assert_close(got, want, rtol=TOLERANCE[torch.float32], atol=TOLERANCE[torch.float32])
    assert got.is_contiguous(memory_format=torch.channels_last)


def _hand_block():
    return randomize_batchnorm(handwritten.InvertedResidual(24, 72, 24, 5, 1, True, True).eval())


# ------------------------------------------------------------------------------------------ the module
def test_state_dict_training_and_refolding():
    block = stock_block("timm-ir-k5s2-se-hswish").to(DEVICE)
    fused = InvertedResidual.from_module(block, backend="reference")
    assert fused.state_dict().keys() == block.state_dict().keys()
    for key, value in block.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value)
    assert all(getattr(fused, name).dtype == torch.float32 for name in ("w_expand", "w_dw", "w_se_reduce", "w_project"))
    if DEVICE.type == "cuda":  # folded in the layout its device's backends read (the GPU kernels' layouts)
        assert fused.w_dw.permute(2, 3, 1, 0).is_contiguous() and fused.w_project.t().is_contiguous()
    else:  # the reference backend's, which oneDNN reads without a reorder
        assert fused.w_dw.is_contiguous() and fused.w_project.is_contiguous()
    x = random_x((2, 24, 13, 10))

    # Training, or gradients wanted: the stock block runs.
    fused.train()
    assert torch.equal(fused(x), block(x))
    x_grad = x.clone().requires_grad_()
    fused.eval()(x_grad).sum().backward()
    assert x_grad.grad is not None

    # A stock checkpoint loads into the fused module (nested, strict) and is folded again.
    other = stock_block("timm-ir-k5s2-se-hswish").to(DEVICE)
    randomize_batchnorm(other, torch.Generator().manual_seed(7))
    model = nn.Sequential(nn.Identity(), fused)
    with torch.no_grad():
        before = fused(x)
        model.load_state_dict(nn.Sequential(nn.Identity(), other).state_dict())
        assert not torch.equal(before, fused(x))
        assert_close_to_reference(fused(x), stock64(other, x), torch.float32)
        # Training changes the statistics; back in eval mode the module folds them again.
        fused.train()
        block(x)
        fused.eval()
        assert_close_to_reference(fused(x), stock64(block, x), torch.float32)
        # .half() converts the stock block; the folded buffers are float32 again, from the half weights.
        fused.half()
        assert fused.w_project.dtype == torch.float32
        assert_close_to_reference(fused(x.half()), stock64(block, x.half()), torch.float16)


class TwiceTheResidual(nn.Module):
    """The layers of a block, but the forward adds its input twice: the numeric check must refuse it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        return 2 * x + self.conv(x)


@pytest.mark.parametrize("module, message", [
    (nn.Conv2d(8, 8, 3), "expected a depthwise conv"),
    (timm_blocks.InvertedResidual(16, 16, 3, 1, exp_ratio=2.0, exp_kernel_size=3), "plain 1x1 convs"),
    (nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Tanh(), nn.Conv2d(8, 8, 1),
                   nn.BatchNorm2d(8)), r"Tanh\) computes no known activation"),
    (nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)),
     "expected a BatchNorm2d after 2"),
    (nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8),
                   nn.Conv2d(8, 8, 1)), r"4 \(Conv2d\) follows the project conv"),
    (TwiceTheResidual(), "does not compute one"),
], ids=["conv", "3x3-expand", "tanh", "no-project-bn", "trailing-conv", "twice-the-residual"])
def test_from_module_refuses_what_is_not_a_block(module, message):
    with pytest.raises(ValueError, match=message):
        InvertedResidual.from_module(module)


# ------------------------------------------------------------------------------------------ bad inputs
def _bad_inputs():
    x = random_x((2, 12, 6, 6))
    w = random_block(12, 30, 12, (3, 3), 8)
    good = dict(x=x, **w)
    return [
        ("expand-shape", dict(good, w_expand=torch.randn(30, 13)), r"w_expand must be \[30, 12\]"),
        ("no-expand-bias", dict(good, b_expand=None), "w_expand is given without b_expand"),
        ("no-expand-wrong-E", dict(good, w_expand=None, b_expand=None), "without an expand conv"),
        ("dw-shape", dict(good, w_dw=torch.randn(30, 2, 3, 3)), r"w_dw must be a depthwise weight"),
        ("project-shape", dict(good, w_project=torch.randn(12, 29)), r"w_project must be \[12, 30\]"),
        ("project-bias", dict(good, b_project=torch.randn(11)), r"b_project must be \[12\]"),
        ("se-count", dict(good, se=w["se"][:3]), "se must be"),
        ("se-half", dict(good, se=(w["se"][0], None, None, None)), "needs both w_se_reduce and w_se_expand"),
        ("se-shape", dict(good, se=(torch.randn(8, 31), None, w["se"][2], None)), r"w_reduce must be \[8, 30\]"),
        ("residual-stride", dict(good, stride=2, residual=True), "a residual add needs"),
        ("residual-channels", dict(good, w_project=torch.randn(13, 30), b_project=torch.randn(13), residual=True),
         "a residual add needs"),
        ("post-se-without-se", dict(good, se=None, post_se_activation="relu"), "block without SE"),
        ("activation", dict(good, dw_activation="mish"), "activation 'mish'"),
        ("gate", dict(good, se_gate="tanh"), "gate 'tanh'"),
        ("empty-output", dict(good, w_dw=torch.randn(30, 1, 9, 9), padding=0), "the output would be empty"),
        ("x-float64", dict(good, x=x.double()), "x must be float32, float16 or bfloat16"),
        ("backend", dict(good, backend="opencl"), "backend 'opencl'"),
    ]


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("name, kwargs, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(name, kwargs, message):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=message):
        ops.inverted_residual(kwargs.pop("x"), kwargs.pop("w_dw"), kwargs.pop("b_dw"), kwargs.pop("w_project"),
                              kwargs.pop("b_project"), **kwargs)


# ------------------------------------------------------------------------------- backends and launches
def _args(c=16, e=64, o=24, k=(3, 3), stride=2, se=None, shape=(2, 16, 14, 14)):
    w = random_block(c, e, o, k, se)
    se_weights = w.get("se", (None, None, None, None))
    return normalise_inverted_residual(BlockArgs(
        random_x(shape).cpu(), w["w_expand"].cpu(), w["b_expand"].cpu(), "relu", w["w_dw"].cpu(), w["b_dw"].cpu(),
        [stride, stride], [k[0] // 2] * 4, [1, 1], "relu", *[t if t is None else t.cpu() for t in se_weights], "relu",
        "sigmoid", "identity", w["w_project"].cpu(), w["b_project"].cpu(), "identity", False))


def test_cuda_declines_and_triton_states_its_limits():
    args = _args()
    assert dispatch.why_not(get_backend("cuda"), "inverted_residual", args, explicit=True) == \
        "it has no inverted_residual kernel"
    assert triton_block.limit(args) is None
    wide = _args(o=triton_block.MAX_OUT_CHANNELS + 8)
    assert "output channels" in triton_block.limit(wide)
    dilated = normalise_inverted_residual(args._replace(dilation=[40, 40], padding=[40] * 4,
                                                        x=random_x((1, 16, 90, 90)).cpu()))
    assert "halo" in triton_block.limit(dilated)


@pytest.mark.parametrize("se, launches", [(None, 1), (16, 3)], ids=["no-se", "se"])
def test_one_kernel_without_se_three_launches_with(se, launches):
    assert len(triton_block.plan(_args(se=se))[1]) == launches


MOBILENETV3_LARGE_BLOCKS = [(16 if exp == 16 else c_in, exp, c, k, s, se)
                            for c_in, (k, exp, c, se, _, s) in zip([16, 16, 24, 24, 40, 40, 40, 80, 80, 80, 80, 112,
                                                                    112, 160, 160], handwritten.LARGE)]


def test_gpu_tiles_have_dot_extents_of_16_and_fit():
    """The GPU configuration (not the interpreter's) of every MobileNetV3-Large block at 224x224: every tl.dot
    extent >= 16, within the kernel's limits, the expand conv recomputed at most 4 times per pixel (5x5 at
    stride 1: a 128-pixel halo for 32 outputs)."""
    size = 112
    for c, e, o, k, s, se in MOBILENETV3_LARGE_BLOCKS:
        args = _args(c, e, o, (k, k), s, 8 if se else None, shape=(1, c, size, size))
        tile = triton_block.tiles(args, interpreter=False)
        assert tile["TILE_H"] * tile["TILE_W"] >= 16 and tile["HALO_P"] >= 16
        assert min(tile["BLOCK_C"], tile["BLOCK_E"], tile["BLOCK_O"]) >= 16
        assert triton_block.limit(args, interpreter=False) is None
        assert 1.0 < triton_block.expand_recompute(args) <= 4.0
        size = (size + 2 * (k // 2) - k) // s + 1


# ------------------------------------------------------------------------------------- patch: block fusion
import mbkernels  # noqa: E402
from mbkernels.nn import DWConvBNAct  # noqa: E402

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

PATCH_MODELS = {
    "timm:mobilenetv3_large_100": lambda: timm.create_model("mobilenetv3_large_100"),
    "timm:mobilenetv3_small_100": lambda: timm.create_model("mobilenetv3_small_100"),
    "timm:efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
    "tv:mobilenet_v3_large": torchvision.models.mobilenet_v3_large,
    "tv:efficientnet_b0": torchvision.models.efficientnet_b0,
    "tv:mobilenet_v2": torchvision.models.mobilenet_v2,
    "hand:mobilenetv3_large": handwritten.mobilenetv3_large,
}


def patch_stock(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(PATCH_MODELS[name]().eval(), torch.Generator().manual_seed(0))


def stock_layers_run(model: nn.Module, x: torch.Tensor) -> int:
    """How many stock 1x1 convs and BatchNorms a forward runs."""
    ran = []
    hooks = [m.register_forward_hook(lambda m, inputs, out: ran.append(m)) for m in model.modules()
             if isinstance(m, nn.BatchNorm2d) or (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1))]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return len(ran)


PATCH_CASES = [(name, "reference") for name in PATCH_MODELS] + [
    ("timm:mobilenetv3_small_100", "triton"), ("hand:mobilenetv3_large", "triton")]


@pytest.mark.parametrize("name, backend", PATCH_CASES, ids=[f"{n}-{b}" for n, b in PATCH_CASES])
def test_patched_models_run_no_stock_layer_inside_their_blocks(name, backend):
    """The issue's bar: every block fused (blocks='all'), at least 85% of the model's 1x1 convs and BNs no longer
    run stock (those left are outside the blocks), outputs within float32 tolerance of the float64 stock model."""
    stock = patch_stock(name)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    want = stock64(stock, x)
    before = stock_layers_run(stock, x)
    patched = mbkernels.patch(copy.deepcopy(stock), backend=backend, blocks="all")
    fused = [m for m in patched.modules() if isinstance(m, InvertedResidual)]
    assert fused and not any(isinstance(m, DWConvBNAct) for m in patched.modules())
    assert stock_layers_run(patched, x) <= 0.15 * before
    with torch.no_grad():
        out = patched(x.to(DEVICE))
    assert ((out.double().cpu() - want).abs().max() / want.abs().max()).item() < 1e-5
    assert patched.state_dict().keys() == stock.state_dict().keys()
    assert all(torch.equal(value, stock.state_dict()[key]) for key, value in patched.state_dict().items())
    assert str(mbkernels.unpatch(patched)) == str(stock)


def test_the_planner_decides_per_block_and_reports_it():
    model = patch_stock("timm:mobilenetv3_large_100")
    report = mbkernels.patch_report(model)
    blocks = [m for m in model.modules() if type(m).__name__ in ("InvertedResidual", "DepthwiseSeparableConv")]
    assert len(report.blocks) == len(blocks)
    planned = {decision.plan for decision in report.blocks}
    assert planned <= {"block", "layers"}
    for decision in report.blocks:
        assert decision.block_bytes < decision.layer_bytes and decision.recompute >= 1.0
        assert (decision.plan == "layers") == bool(decision.reason)
    assert report.count("inverted_residual", "fusable") == sum(d.plan == "block" for d in report.blocks)
    # A block planned for layer fusion has its depthwise conv and SE fused instead.
    layered = sum(d.plan == "layers" for d in report.blocks)
    assert report.count("dwconv_bn_act", "fusable") == layered
    text = str(report)
    reasons = {(d.plan, d.reason) for d in report.blocks}
    if len(reasons) == 1:  # one plan for one reason (a CPU model's): said once
        assert f"block plans: {report.blocks[0].plan} for all {len(blocks)} blocks: " in text
        assert text.count(report.blocks[0].reason) == 1
    else:
        assert "block plans" in text and "layers B/px" in text
    patched = mbkernels.patch(copy.deepcopy(model), backend="reference")
    assert sum(isinstance(m, InvertedResidual) for m in patched.modules()) == len(blocks) - layered


def test_blocks_false_keeps_layer_fusion_only():
    model = mbkernels.patch(patch_stock("tv:mobilenet_v2"), backend="reference", blocks=False)
    assert not any(isinstance(m, InvertedResidual) for m in model.modules())
    assert sum(isinstance(m, DWConvBNAct) for m in model.modules()) == 17
    assert mbkernels.patch_report(model, blocks=False).blocks == []
    with pytest.raises(ValueError, match="blocks must be True, False or 'all'"):
        mbkernels.patch(model, blocks="some")


def test_a_cpu_model_gets_layer_fusion_and_says_why():
    report = mbkernels.patch_report(nn.Sequential(stock_block("timm-ir-k3s1-res")))
    assert [d.plan for d in report.blocks] == ["layers"] and "a CPU model" in report.blocks[0].reason


def test_the_cost_model_prefers_blocks_for_narrow_layers_and_says_why_not_for_wide_ones(monkeypatch):
    """Narrow early blocks save HBM bytes cheaply; wide late ones re-read their weights from L2 per small tile."""
    monkeypatch.setattr(cost, "on_gpu", lambda fused: True)  # the GPU's cost model, here too
    narrow = mbkernels.patch_report(nn.Sequential(stock_block("timm-ir-k3s1-res")))
    wide = mbkernels.patch_report(nn.Sequential(randomize_batchnorm(
        timm_blocks.InvertedResidual(192, 192, 5, 1, exp_ratio=6.0).eval())))
    assert [d.plan for d in narrow.blocks] == ["block"]
    assert [d.plan for d in wide.blocks] == ["layers"] and "L2 re-reads" in wide.blocks[0].reason
