"""Every padding slot [top, bottom, left, right] matters: in each backend that runs the depthwise conv (cuda host
emulation, triton, reference) or the whole block (triton, reference), and in the fused modules that work a padding
out themselves (PyTorch's 'same' with even kernels, timm's TensorFlow 'SAME' at stride 2).

The paddings give every slot a value no other slot has, and each slot is zero in one case and not in another, so
a backend that reads one slot for another, or ignores one, computes another output (or shape); TensorFlow 'SAME'
at stride 2 gives the lopsided paddings real models have ([0, 1, 0, 1] ...). Float64 references from stock torch
functions and modules (tests/oracle.py), outputs poisoned before each call.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ALL_BACKENDS, DEVICE, assert_close_to_reference, random_x
from oracle import as64, dwconv64, se64, stock_activation
from mbkernels import ops
from mbkernels.nn import ConvBNAct, DWConvBNAct, InvertedResidual
from mbkernels.match import randomize_batchnorm

timm_layers = pytest.importorskip("timm.layers")

BLOCK_BACKENDS = [p for p in ALL_BACKENDS if p.id != "cuda"]  # the cuda backend has no block kernel
# The float64 oracle's own F.conv2d warns about its copy for PyTorch 'same' with even kernels.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

# name: (kernel, stride, dilation, padding [top, bottom, left, right], input plane). "a" and "b" give every slot
# a value the other three lack (each slot is 0 in one of them); the square 3x3 / 5x5 kernels at stride 1 or 2
# take the cuda backend's fast paths, the others its generic ones.
PADDED_CASES = {
    "k5s1-a": ((5, 5), (1, 1), (1, 1), [1, 3, 0, 2], (9, 11)),
    "k5s2-b": ((5, 5), (2, 2), (1, 1), [2, 0, 3, 1], (12, 9)),
    "k3s1-b": ((3, 3), (1, 1), (1, 1), [2, 0, 3, 1], (8, 7)),
    "k3x5-s2x1-d2x1-a": ((3, 5), (2, 1), (2, 1), [1, 3, 0, 2], (11, 10)),
    "k5x3-s1x2-d1x2-b": ((5, 3), (1, 2), (1, 2), [2, 0, 3, 1], (9, 12)),
    # TensorFlow 'SAME' at stride 2 (timm's pad_same): the odd pixel at the bottom / right.
    "tf-k3s2-even": ((3, 3), (2, 2), (1, 1), [0, 1, 0, 1], (10, 12)),
    "tf-k3s2-odd-even": ((3, 3), (2, 2), (1, 1), [1, 1, 0, 1], (11, 12)),
    "tf-k5s2-even-odd": ((5, 5), (2, 2), (1, 1), [1, 2, 2, 2], (10, 11)),
}
DTYPES = (torch.float32, torch.float16)


def _case_settings(name: str):
    """The case's dtype, layout and channel count, varied along the list (12: vector loads; 10: scalar)."""
    index = list(PADDED_CASES).index(name)
    return DTYPES[index % 2], ("nchw", "channels_last")[index // 2 % 2], (12, 10)[index // 4 % 2]


# ------------------------------------------------------------------------------------------ the depthwise op
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", PADDED_CASES)
def test_dwconv_op_reads_every_padding_slot(name, layout, backend, poisoned_outputs):
    kernel, stride, dilation, padding, (height, width) = PADDED_CASES[name]
    dtype, _, channels = _case_settings(name)
    x = random_x((2, channels, height, width), dtype, layout)
    weight = torch.randn(channels, 1, *kernel, device=DEVICE) / (kernel[0] * kernel[1]) ** 0.5
    bias = torch.randn(channels, device=DEVICE) + 1.0  # outputs over padding alone are act(bias): not zero
    out = ops.dwconv_bn_act(x, weight, bias, stride, padding, dilation, "silu", backend=backend)
    assert_close_to_reference(out, dwconv64(x, weight, bias, stride, padding, dilation, "silu"), dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dwconv_op_takes_a_pair_as_height_then_width(backend, poisoned_outputs):
    x = random_x((2, 12, 9, 10))
    weight, bias = torch.randn(12, 1, 5, 5, device=DEVICE) / 5, torch.randn(12, device=DEVICE) + 1.0
    out = ops.dwconv_bn_act(x, weight, bias, 1, [1, 2], 1, "relu", backend=backend)
    assert_close_to_reference(out, dwconv64(x, weight, bias, [1, 1], [1, 1, 2, 2], [1, 1], "relu"), torch.float32)


# ---------------------------------------------------------------------------------------------- the block op
def block64(x, weights: dict, stride, padding, dilation, residual: bool) -> torch.Tensor:
    """expand (relu6) -> depthwise (hardswish) -> [SE relu / sigmoid] -> project [+ x], in float64 from stock
    functions."""
    h = as64(x).cpu()
    if "w_expand" in weights:
        h = stock_activation("relu6")(F.conv2d(h, as64(weights["w_expand"]).cpu()[:, :, None, None],
                                               as64(weights["b_expand"]).cpu()))
    d = dwconv64(h, weights["w_dw"], weights["b_dw"], stride, padding, dilation, "hardswish")
    if "se" in weights:
        d = se64(d, *weights["se"], "relu", "sigmoid")
    y = F.conv2d(d, as64(weights["w_project"]).cpu()[:, :, None, None], as64(weights["b_project"]).cpu())
    return y + as64(x).cpu() if residual else y


def _block_weights(channels: int, hidden: int, out_channels: int, kernel, expand: bool, se: bool) -> dict:
    weights = dict(w_dw=torch.randn(hidden, 1, *kernel) / (kernel[0] * kernel[1]) ** 0.5,
                   b_dw=torch.randn(hidden) + 1.0,
                   w_project=torch.randn(out_channels, hidden) / hidden ** 0.5, b_project=torch.randn(out_channels))
    if expand:
        weights.update(w_expand=torch.randn(hidden, channels) / channels ** 0.5, b_expand=torch.randn(hidden) + 0.5)
    if se:
        weights["se"] = (torch.randn(6, hidden) / hidden ** 0.5, torch.randn(6), torch.randn(hidden, 6) / 6 ** 0.5,
                         torch.randn(hidden))
    return {k: tuple(t.to(DEVICE) for t in v) if k == "se" else v.to(DEVICE) for k, v in weights.items()}


# expand and SE present or not: the Triton kernel pads the expanded tile (expand) or x itself (no expand), in its
# one-kernel form (no SE) or its first stage (SE).
BLOCK_FORMS = {"expand": (True, False), "expand-se": (True, True), "no-expand": (False, False),
               "no-expand-se": (False, True)}


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
@pytest.mark.parametrize("form", BLOCK_FORMS)
@pytest.mark.parametrize("name", PADDED_CASES)
def test_block_op_reads_every_padding_slot(name, form, backend, poisoned_outputs):
    kernel, stride, dilation, padding, (height, width) = PADDED_CASES[name]
    dtype, layout, channels = _case_settings(name)
    expand, se = BLOCK_FORMS[form]
    hidden = 20 if expand else channels
    x = random_x((2, channels, height, width), dtype, layout)
    weights = _block_weights(channels, hidden, 16, kernel, expand, se)
    out = ops.inverted_residual(x, weights["w_dw"], weights["b_dw"], weights["w_project"], weights["b_project"],
                                w_expand=weights.get("w_expand"), b_expand=weights.get("b_expand"),
                                expand_activation="relu6", stride=stride, padding=padding, dilation=dilation,
                                dw_activation="hardswish", se=weights.get("se"), se_activation="relu",
                                se_gate="sigmoid", backend=backend)
    assert_close_to_reference(out, block64(x, weights, stride, padding, dilation, residual=False), dtype)


# ----------------------------------------------------------------------- fused modules that work a padding out
def _stock64(modules: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(modules).cpu().double().eval()(x.detach().cpu().double())


def _eval_with_random_statistics(module: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_batchnorm(module.eval(), torch.Generator().manual_seed(seed)).to(DEVICE)


# name: (a depthwise conv of 10 channels, input plane): PyTorch 'same' puts an even kernel's odd pixel at the
# bottom / right ((2, 6): [0, 1, 2, 3]); timm's Conv2dSame pads by the input's size (TensorFlow 'SAME').
DEPTHWISE_CONVS = {
    "same-k2x6": (lambda: nn.Conv2d(10, 10, (2, 6), padding="same", groups=10), (7, 9)),
    "same-k6x2": (lambda: nn.Conv2d(10, 10, (6, 2), padding="same", groups=10), (9, 8)),
    "same-k4-d1x3": (lambda: nn.Conv2d(10, 10, 4, padding="same", dilation=(1, 3), groups=10), (8, 13)),
    "tf-same-k3x5-s2-even-odd": (lambda: timm_layers.Conv2dSame(10, 10, (3, 5), stride=2, groups=10), (10, 11)),
    "tf-same-k3x5-s2-odd-even": (lambda: timm_layers.Conv2dSame(10, 10, (3, 5), stride=2, groups=10), (11, 10)),
    "tf-same-k4-s2x1": (lambda: timm_layers.Conv2dSame(10, 10, 4, stride=(2, 1), groups=10), (9, 10)),
    "tf-same-k3-s2-d2x3": (lambda: timm_layers.Conv2dSame(10, 10, 3, stride=2, dilation=(2, 3), groups=10),
                           (10, 13)),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", DEPTHWISE_CONVS)
def test_dwconv_module_pads_as_the_stock_conv(name, backend, poisoned_outputs):
    build, plane = DEPTHWISE_CONVS[name]
    stock = _eval_with_random_statistics(nn.Sequential(build(), nn.BatchNorm2d(10), nn.Hardswish()))
    fused = DWConvBNAct(*stock, backend=backend)
    x = random_x((2, 10, *plane))
    with torch.no_grad():
        assert_close_to_reference(fused(x), _stock64(stock, x), torch.float32)


@pytest.mark.parametrize("name", DEPTHWISE_CONVS)
def test_conv_module_pads_as_the_stock_conv(name):
    """The same paddings for a dense conv (ConvBNAct pads x itself when the padding is lopsided)."""
    build, plane = DEPTHWISE_CONVS[name]
    depthwise = build()
    conv = type(depthwise)(10, 14, depthwise.kernel_size, depthwise.stride, dilation=depthwise.dilation,
                           **({"padding": "same"} if isinstance(depthwise.padding, str) else {}))
    stock = _eval_with_random_statistics(nn.Sequential(conv, nn.BatchNorm2d(14), nn.ReLU()))
    fused = ConvBNAct(*stock)
    x = random_x((2, 10, *plane))
    with torch.no_grad():
        assert_close_to_reference(fused(x), _stock64(stock, x), torch.float32)


def _block_with(dw_conv: nn.Conv2d, channels: int, expand: bool) -> nn.Module:
    """A hand-written block (nn.Sequential: no residual) around dw_conv."""
    hidden = dw_conv.in_channels
    layers = [nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()] if expand else []
    layers += [dw_conv, nn.BatchNorm2d(hidden), nn.Hardswish(), nn.Conv2d(hidden, 16, 1, bias=False),
               nn.BatchNorm2d(16)]
    return _eval_with_random_statistics(nn.Sequential(*layers))


# name: (the block's depthwise conv of 20 channels, input plane). A block's conv has a padding fixed at
# construction: PyTorch 'same' (lopsided for even kernels, stride 1) or [h, w] (h != w tells top from left).
BLOCK_DEPTHWISE_CONVS = {
    "same-k2x6": (lambda: nn.Conv2d(20, 20, (2, 6), padding="same", groups=20), (7, 9)),
    "same-k6x2": (lambda: nn.Conv2d(20, 20, (6, 2), padding="same", groups=20), (9, 8)),
    "k3x5-s2-p1x2": (lambda: nn.Conv2d(20, 20, (3, 5), stride=2, padding=(1, 2), groups=20), (10, 9)),
    "k5x3-s2x1-p2x0": (lambda: nn.Conv2d(20, 20, (5, 3), stride=(2, 1), padding=(2, 0), groups=20), (9, 8)),
}


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
@pytest.mark.parametrize("expand", [True, False], ids=["expand", "no-expand"])
@pytest.mark.parametrize("name", BLOCK_DEPTHWISE_CONVS)
def test_block_module_pads_as_the_stock_block(name, expand, backend, poisoned_outputs):
    build, plane = BLOCK_DEPTHWISE_CONVS[name]
    channels = 12 if expand else 20
    stock = _block_with(build(), channels, expand)
    fused = InvertedResidual.from_module(stock, backend=backend)
    x = random_x((2, channels, *plane), layout="channels_last" if expand else "nchw")
    with torch.no_grad():
        assert_close_to_reference(fused(x), _stock64(stock, x), torch.float32)
