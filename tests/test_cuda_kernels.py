"""The cuda backend's own kernels (csrc/): every kernel path, checked through the host emulation without a GPU.

On CPU tensors the native ops `mbkernels::*_cuda` run the very CUDA kernel code on the host (the same plans,
tiles, vector paths, halos and tails), so these tests cover the kernels' logic here; on a GPU the real kernels
are also held to the emulation and to the float64 reference. The reference is stock torch only: F.conv2d after
F.pad (asymmetric padding), torch.nn activation modules, F.linear. Paths: dwconv channels_last fast <K, S, PIX>
(16-byte vectors; 4 float / 2 half pixels per thread, or 1 on small grids), generic vectorized and scalar (depth multiplier > 1,
C not a multiple of the vector width, misaligned x); NCHW tiled fast <K, S> and generic; squeeze-excite pool
(NCHW / channels_last, vectorized / scalar), the batched mlp (weights in 16-byte vectors or scalar, split rows on
small grids, inputs in several chunks), scale. The ops are called directly, with the native schemas.
"""
import re
import subprocess
import sys
import time
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import HAS_GPU, TOLERANCE, assert_close_to_reference
from mbkernels import activations

_C = pytest.importorskip("mbkernels._C", reason="the CUDA extension mbkernels._C is not built")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU to run the real kernels")

# The stock module each activation spec means.
STOCK_ACTIVATIONS = {
    "identity": nn.Identity(),
    "relu": nn.ReLU(),
    "relu6": nn.ReLU6(),
    "hardswish": nn.Hardswish(),
    "silu": nn.SiLU(),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "leaky_relu": nn.LeakyReLU(),
    "leaky_relu:0.2": nn.LeakyReLU(0.2),
}
ACTIVATIONS = tuple(STOCK_ACTIVATIONS)
STOCK_GATES = {"sigmoid": nn.Sigmoid(), "hardsigmoid": nn.Hardsigmoid()}

dwconv = torch.ops.mbkernels.dwconv_bn_act_cuda
squeeze_excite = torch.ops.mbkernels.squeeze_excite_cuda


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def random_x(shape, dtype, layout, device="cpu"):
    return torch.randn(shape, device=device).to(dtype).contiguous(memory_format=LAYOUTS[layout])


def expected_layout(out, layout):
    if layout == "channels_last" and out.shape[1] > 1 and out.shape[2] * out.shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    else:
        assert out.is_contiguous()


# ------------------------------------------------------------------------------------------------- dwconv
def tap_major(weight):
    """The layout the Python side folds once: element (o, 0, i, j) at (i * kw + j) * C_out + o."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def dwconv_weights(out_channels, kh, kw, device="cpu"):
    weight = torch.randn(out_channels, 1, kh, kw, device=device) / (kh * kw) ** 0.5
    return tap_major(weight), torch.randn(out_channels, device=device) * 0.5


def dwconv_reference(x, weight, bias, stride, padding, dilation, activation):
    top, bottom, left, right = padding
    padded = F.pad(x.double(), (left, right, top, bottom))
    y = F.conv2d(padded, weight.double(), bias.double(), stride, 0, dilation, groups=x.shape[1])
    return STOCK_ACTIVATIONS[activation](y)


def check_dwconv(shape, kernel, stride, padding, dilation, activation, dtype, layout, multiplier=1):
    x = random_x(shape, dtype, layout)
    weight, bias = dwconv_weights(shape[1] * multiplier, *kernel)
    out = dwconv(x, weight, bias, stride, padding, dilation, activation)
    assert_close_to_reference(out, dwconv_reference(x, weight, bias, stride, padding, dilation, activation), dtype)
    expected_layout(out, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("channels", [7, 72])  # channels_last: scalar fallback, 16-byte vectors
@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2])
def test_dwconv_fast_paths(kernel_size, stride, channels, dtype, layout, poisoned_outputs):
    activation = ACTIVATIONS[(kernel_size + stride + channels) % len(ACTIVATIONS)]
    check_dwconv((2, channels, 15, 17), (kernel_size, kernel_size), [stride] * 2, [kernel_size // 2] * 4, [1, 1],
                 activation, dtype, layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kernel_size, stride", [(3, 1), (3, 2), (5, 1), (5, 2), (7, 1), (7, 2)])
def test_dwconv_channels_last_several_pixels_per_thread(kernel_size, stride, dtype, poisoned_outputs):
    """A grid big enough for the fast path's several output pixels per thread (4 float, 2 half; small grids
    take 1); an odd width leaves a tail."""
    if dtype != torch.float16 and (kernel_size, stride) not in ((3, 1), (5, 2)):
        pytest.skip("float32 / bfloat16 share the kernel template: two shapes are enough")
    check_dwconv((4, 64, 66, 63), (kernel_size, kernel_size), [stride] * 2, [kernel_size // 2] * 4, [1, 1],
                 "hardswish", dtype, "channels_last")


ASYMMETRIC_PADDINGS = {
    # name: (kernel, stride, padding [top, bottom, left, right], input plane)
    "tf_same_k3s2_even": (3, 2, [0, 1, 0, 1], (16, 18)),
    "tf_same_k5s2_even": (5, 2, [1, 2, 1, 2], (14, 16)),
    "tf_same_k3s1": (3, 1, [1, 1, 1, 1], (15, 17)),
    "tf_same_k7s2_odd": (7, 2, [3, 3, 2, 3], (15, 16)),
    "lopsided_k3s1": (3, 1, [2, 0, 0, 3], (9, 11)),
    "lopsided_k5s2": (5, 2, [0, 4, 3, 1], (12, 9)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("name", ASYMMETRIC_PADDINGS)
def test_dwconv_asymmetric_padding(name, dtype, layout, poisoned_outputs):
    kernel_size, stride, padding, plane = ASYMMETRIC_PADDINGS[name]
    check_dwconv((2, 24, *plane), (kernel_size, kernel_size), [stride] * 2, padding, [1, 1], "relu6", dtype,
                 layout)


GENERIC_SHAPES = {
    # name: (kernel, stride, padding [top, bottom, left, right], dilation)
    "k1": ((1, 1), [1, 1], [0, 0, 0, 0], [1, 1]),
    "k4_even": ((4, 4), [1, 1], [2, 2, 1, 1], [1, 1]),
    "k4_tf_same": ((4, 4), [1, 1], [1, 2, 1, 2], [1, 1]),
    "k9": ((9, 9), [1, 1], [4, 4, 4, 4], [1, 1]),
    "k3_dilation2": ((3, 3), [1, 1], [2, 2, 2, 2], [2, 2]),
    "k3x5_asymmetric_padding": ((3, 5), [1, 2], [0, 0, 3, 3], [1, 1]),
    "k3_stride3": ((3, 3), [3, 3], [1, 1, 1, 1], [1, 1]),
    "k5_stride2x1_dilation3x1": ((5, 5), [2, 1], [1, 1, 2, 2], [3, 1]),
    "k3_no_padding": ((3, 3), [1, 1], [0, 0, 0, 0], [1, 1]),
    "k2x3_lopsided": ((2, 3), [2, 1], [1, 0, 0, 2], [1, 2]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("channels", [12, 16])
@pytest.mark.parametrize("name", GENERIC_SHAPES)
def test_dwconv_generic_path(name, channels, dtype, layout, poisoned_outputs):
    kernel, stride, padding, dilation = GENERIC_SHAPES[name]
    activation = ACTIVATIONS[(len(name) + channels) % len(ACTIVATIONS)]
    check_dwconv((2, channels, 15, 17), kernel, stride, padding, dilation, activation, dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("multiplier", [2, 3])
@pytest.mark.parametrize("kernel, stride, padding", [
    ((3, 3), [1, 1], [1, 1, 1, 1]),   # a fast shape: M > 1 takes the generic channels_last path
    ((5, 5), [2, 2], [1, 2, 1, 2]),
    ((3, 2), [1, 2], [0, 2, 1, 0]),
], ids=["k3s1", "k5s2_tf_same", "k3x2_generic"])
def test_dwconv_depth_multiplier(kernel, stride, padding, multiplier, dtype, layout, poisoned_outputs):
    check_dwconv((2, 8, 11, 13), kernel, stride, padding, [1, 1], "silu", dtype, layout, multiplier=multiplier)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("plane", [(1, 1), (7, 7), (56, 56), (3, 40)], ids=str)
@pytest.mark.parametrize("channels", [1, 120])
@pytest.mark.parametrize("kernel_size, stride", [(3, 1), (5, 2)])
def test_dwconv_planes(kernel_size, stride, channels, plane, layout, poisoned_outputs):
    """Batch 1 included: small grids shrink the blocks and the pixels per thread."""
    check_dwconv((1, channels, *plane), (kernel_size, kernel_size), [stride] * 2, [kernel_size // 2] * 4, [1, 1],
                 "hardswish", torch.float16, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dwconv_activations(activation, layout, poisoned_outputs):
    for kernel in ((3, 3), (2, 3)):  # a fast and a generic path
        check_dwconv((3, 8, 9, 10), kernel, [1, 1], [1, 1, 1, 1], [1, 1], activation, torch.float32, layout)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dwconv_activations_propagate_nan(activation):
    """NaN comes out where it went in (clamps compare, they do not fminf/fmaxf), like stock torch."""
    x = torch.tensor([float("nan"), -7.0, -2.0, -0.5, 0.0, 0.5, 3.0, 7.0]).view(1, 8, 1, 1)
    weight, bias = torch.ones(8, 1, 1, 1), torch.zeros(8)
    out = dwconv(x, weight, bias, [1, 1], [0, 0, 0, 0], [1, 1], activation)
    torch.testing.assert_close(out, STOCK_ACTIVATIONS[activation](x), equal_nan=True)


WEIGHT_LAYOUTS = {
    "tap_major": tap_major,
    "contiguous": lambda w: w.contiguous(),
    "transposed_view": lambda w: w.transpose(2, 3).contiguous().transpose(2, 3),
    "tap_major_misaligned": lambda w: torch.as_strided(
        torch.cat([torch.zeros(1), tap_major(w).permute(2, 3, 1, 0).reshape(-1)]), w.shape,
        tap_major(w).stride(), storage_offset=1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kernel", [(3, 3), (2, 3)], ids=["fast", "generic"])
@pytest.mark.parametrize("weight_layout", WEIGHT_LAYOUTS)
def test_dwconv_any_weight_layout(weight_layout, kernel, layout, poisoned_outputs):
    """Any strides give the same bits as the tap-major layout the fast paths read directly."""
    x = random_x((2, 16, 9, 10), torch.float16, layout)
    weight, bias = dwconv_weights(16, *kernel)
    laid_out = WEIGHT_LAYOUTS[weight_layout](weight.contiguous())
    assert torch.equal(laid_out, weight)
    out = dwconv(x, laid_out, bias, [1, 1], [1, 1, 1, 1], [1, 1], "relu")
    assert torch.equal(out, dwconv(x, weight, bias, [1, 1], [1, 1, 1, 1], [1, 1], "relu"))
    assert_close_to_reference(out, dwconv_reference(x, weight, bias, [1, 1], [1, 1, 1, 1], [1, 1], "relu"),
                              torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_dwconv_misaligned_channels_last_takes_the_scalar_path(dtype, poisoned_outputs):
    """A channels_last x whose data starts off a 16-byte boundary cannot use vector loads."""
    shape, channels = (2, 16, 9, 11), 16
    storage = torch.randn(2 * 16 * 9 * 11 + 1).to(dtype)
    strides = (16 * 9 * 11, 1, 11 * 16, 16)
    x = torch.as_strided(storage, shape, strides, storage_offset=1)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16 != 0
    weight, bias = dwconv_weights(channels, 3, 3)
    out = dwconv(x, weight, bias, [1, 1], [1, 1, 1, 1], [1, 1], "relu6")
    assert_close_to_reference(out, dwconv_reference(x, weight, bias, [1, 1], [1, 1, 1, 1], [1, 1], "relu6"), dtype)


def test_dwconv_emulation_is_fast_enough():
    """The emulation runs compiled kernel code: a 2x72x112x112 layer takes well under a second per layout."""
    weight, bias = dwconv_weights(72, 3, 3)
    for layout in LAYOUTS:
        x = random_x((2, 72, 112, 112), torch.float16, layout)
        start = time.perf_counter()
        out = dwconv(x, weight, bias, [1, 1], [1, 1, 1, 1], [1, 1], "hardswish")
        elapsed = time.perf_counter() - start
        reference = dwconv_reference(x, weight, bias, [1, 1], [1, 1, 1, 1], [1, 1], "hardswish")
        assert_close_to_reference(out, reference, torch.float16)
        assert elapsed < 2.0, f"{layout}: {elapsed:.2f} s"


# ------------------------------------------------------------------------------------------ squeeze-excite
def se_weights(channels, reduced, with_bias, device="cpu"):
    w_reduce = torch.randn(reduced, channels, device=device) / channels**0.5
    w_expand = torch.randn(channels, reduced, device=device) / reduced**0.5
    if not with_bias:
        return w_reduce, None, w_expand, None
    return w_reduce, torch.randn(reduced, device=device), w_expand, torch.randn(channels, device=device)


def se_reference(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate):
    double = lambda t: None if t is None else t.double()  # noqa: E731
    pooled = x.double().mean(dim=(2, 3))
    hidden = STOCK_ACTIVATIONS[activation](F.linear(pooled, double(w_reduce), double(b_reduce)))
    scale = STOCK_GATES[gate](F.linear(hidden, double(w_expand), double(b_expand)))
    return x.double() * scale[:, :, None, None]


SE_SHAPES = [
    # (N, C, H, W, R)
    (1, 8, 1, 1, 3),
    (5, 16, 7, 7, 5),      # small planes, many per pool block; NCHW scalar (49 not a multiple of the vector)
    (2, 24, 56, 56, 7),    # big planes: split over several pool blocks
    (5, 72, 15, 17, 19),   # odd plane; R not a multiple of 4: scalar weights in the expand layer
    (1, 120, 14, 14, 33),
    (1, 960, 7, 7, 240),   # channels_last: many channel vectors per block; C over one mlp input chunk
    (2, 1280, 1, 1, 321),
    (3, 12, 28, 28, 9),    # channels_last float16: C not a multiple of 8
    (19, 40, 5, 3, 12),    # more samples than one mlp block holds, with a tail
    (3, 7, 4, 4, 2),       # C not a multiple of 4: scalar weights in the reduce layer
    (48, 64, 16, 17, 16),  # a grid big enough for 4 vectors per scale thread (small grids take 1)
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_squeeze_excite(shape, dtype, layout, poisoned_outputs):
    n, c, h, w, r = shape
    with_bias = (n + c) % 2 == 0
    activation = ACTIVATIONS[(n + c + h) % len(ACTIVATIONS)]
    gate = tuple(STOCK_GATES)[(c + h) % 2]
    x = random_x((n, c, h, w), dtype, layout)
    weights = se_weights(c, r, with_bias)
    out = squeeze_excite(x, *weights, activation, gate)
    assert_close_to_reference(out, se_reference(x, *weights, activation, gate), dtype)
    expected_layout(out, layout)
    again = squeeze_excite(x, *weights, activation, gate)
    assert torch.equal(out, again), "repeated calls must give the same bits"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gate", STOCK_GATES)
@pytest.mark.parametrize("shape", [(2, 72, 14, 14, 24), (17, 120, 7, 7, 32)], ids=lambda s: "x".join(map(str, s)))
def test_squeeze_excite_hardswish_hidden(shape, gate, layout, poisoned_outputs):
    """MobileNetV3-style SE with a hardswish hidden activation (timm's efficientnet / lcnet variants)."""
    n, c, h, w, r = shape
    x = random_x((n, c, h, w), torch.float16, layout)
    weights = se_weights(c, r, True)
    out = squeeze_excite(x, *weights, "hardswish", gate)
    assert_close_to_reference(out, se_reference(x, *weights, "hardswish", gate), torch.float16)


def test_squeeze_excite_misaligned_x_takes_the_scalar_path(poisoned_outputs):
    storage = torch.randn(2 * 16 * 8 * 8 + 1).to(torch.float16)
    x = torch.as_strided(storage, (2, 16, 8, 8), (16 * 64, 64, 8, 1), storage_offset=1)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    weights = se_weights(16, 5, True)
    out = squeeze_excite(x, *weights, "relu", "hardsigmoid")
    assert_close_to_reference(out, se_reference(x, *weights, "relu", "hardsigmoid"), torch.float16)


# ----------------------------------------------------------------------------------- the activation table
# mbkernels.activations is the table. Its C++ copy (activations.cuh: the names, defaults, parser and math of the
# CUDA kernels) and the ATen math of the public ops' CPU kernels (public_ops.cpp) are held to it here.
TABLE_SPECS = activations.ACTIVATIONS + ("leaky_relu:0.37",)  # every name, leaky_relu with its default and not
# Where the activations and gates bend (0, +-3, 6), both sides of those points, and the tails.
PROBE = torch.tensor([-9.0, -6.0, -3.5, -3.0, -2.5, -1.0, -0.3, 0.0, 0.3, 1.0, 2.5, 3.0, 3.5, 6.0, 6.5, 9.0])


def test_the_kernels_table_is_mbkernels_activations():
    assert _C.ACTIVATIONS == activations.ACTIVATIONS
    assert _C.GATES == activations.GATES
    assert _C.PARAMETER_DEFAULTS == pytest.approx(activations.PARAMETER_DEFAULTS, rel=1e-7)  # float32 in C++


def probe_input():
    """PROBE's points, each in several places, as x [2, 16, 3, 5] for a 1x1 depthwise conv of weight 1, bias 0."""
    x = PROBE.repeat(2 * 3 * 5)[torch.randperm(2 * 16 * 3 * 5)].view(2, 16, 3, 5)
    return x, torch.ones(16, 1, 1, 1), torch.zeros(16)


def se_probe_input():
    """squeeze_excite arguments whose gate inputs lie near PROBE's points (b_expand), channel by channel."""
    x = torch.randn(2, 16, 3, 5)
    w_reduce, b_reduce, w_expand, _ = se_weights(16, 4, True)
    return x, w_reduce, b_reduce, w_expand * 0.1, PROBE[torch.randperm(16)]


def se_by_the_table(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate):
    pooled = x.double().mean(dim=(2, 3))
    hidden = activations.apply_activation(activation, F.linear(pooled, w_reduce.double(), b_reduce.double()))
    scale = activations.apply_gate(gate, F.linear(hidden, w_expand.double(), b_expand.double()))
    return x.double() * scale[:, :, None, None]


TABLE_TOLERANCE = dict(rtol=2e-6, atol=1e-6)  # float32 math against float64


def assert_computes_the_table(out, expected):
    torch.testing.assert_close(out.double(), expected, **TABLE_TOLERANCE)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", TABLE_SPECS)
def test_the_kernels_activations_compute_mbkernels_activations(spec, layout, poisoned_outputs):
    x, weight, bias = probe_input()
    out = dwconv(x.contiguous(memory_format=LAYOUTS[layout]), weight, bias, [1, 1], [0] * 4, [1, 1], spec)
    assert_computes_the_table(out, activations.apply_activation(spec, x.double()))


@pytest.mark.parametrize("gate", activations.GATES)
@pytest.mark.parametrize("spec", TABLE_SPECS)
def test_the_kernels_squeeze_excite_computes_mbkernels_activations_and_gates(spec, gate, poisoned_outputs):
    args = se_probe_input()
    assert_computes_the_table(squeeze_excite(*args, spec, gate), se_by_the_table(*args, spec, gate))


# The public ops' C++ CPU kernels, in a process that loads mbkernels._C as a plain library: in this one,
# mbkernels.ops has put its own kernels on those ops (the dispatcher keeps the C++ ones inactive behind them).
# Each call gives its output, or its error's message.
RUN_THE_PUBLIC_OPS_IN_CPP = """
import sys
import torch

library, inputs, outputs = sys.argv[1:]
torch.ops.load_library(library)
probe, se_probe, specs, gates = torch.load(inputs)


def run(op, *args):
    try:
        return op(*args)
    except RuntimeError as error:
        return str(error).splitlines()[0]


torch.save({
    **{spec: run(torch.ops.mbkernels.dwconv_bn_act, *probe, [1, 1], [0, 0, 0, 0], [1, 1], spec, "")
       for spec in specs},
    **{(spec, gate): run(torch.ops.mbkernels.squeeze_excite, *se_probe, spec, gate, "")
       for spec in specs for gate in gates},
}, outputs)
"""


def test_the_public_ops_cpp_kernels_compute_mbkernels_activations_and_gates(tmp_path):
    """The CPU kernels C++ programs run (AOTInductor packages of patched models), every spec and gate."""
    probe, se_probe = probe_input(), se_probe_input()
    torch.save((probe, se_probe, TABLE_SPECS, activations.GATES), tmp_path / "inputs.pt")
    run = subprocess.run([sys.executable, "-c", RUN_THE_PUBLIC_OPS_IN_CPP, _C.__file__, str(tmp_path / "inputs.pt"),
                          str(tmp_path / "outputs.pt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    outputs = torch.load(tmp_path / "outputs.pt")
    expected = {spec: activations.apply_activation(spec, probe[0].double()) for spec in TABLE_SPECS}
    expected.update({(spec, gate): se_by_the_table(*se_probe, spec, gate)
                     for spec in TABLE_SPECS for gate in activations.GATES})
    wrong = {}
    for call, want in expected.items():
        got = outputs[call]
        if isinstance(got, str):
            wrong[call] = got
        elif not torch.allclose(got.double(), want, **TABLE_TOLERANCE):
            wrong[call] = f"off by up to {(got.double() - want).abs().max().item():.3g}"
    assert not wrong, "\n".join(f"{call}: {why}" for call, why in wrong.items())


# -------------------------------------------------------------------------------------- the op contracts
def test_empty_batch_gives_empty_outputs():
    x = torch.randn(0, 8, 5, 5)
    weight, bias = dwconv_weights(16, 3, 3)
    out = dwconv(x, weight, bias, [2, 2], [1, 1, 1, 1], [1, 1], "relu")
    assert out.shape == (0, 16, 3, 3)
    out = squeeze_excite(x, *se_weights(8, 3, True), "relu", "sigmoid")
    assert out.shape == (0, 8, 5, 5)


def _dwconv_args(**changes):
    args = dict(x=torch.randn(2, 8, 5, 5), weight=torch.randn(8, 1, 3, 3), bias=torch.randn(8), stride=[1, 1],
                padding=[1, 1, 1, 1], dilation=[1, 1], activation="relu")
    args.update(changes)
    return args


DWCONV_BAD = {
    "x_3d": (dict(x=torch.randn(8, 5, 5)), r"x must be \[N, C, H, W\]"),
    "x_int": (dict(x=torch.ones(2, 8, 5, 5, dtype=torch.int32)), "x must be float32"),
    "x_float64": (dict(x=torch.randn(2, 8, 5, 5, dtype=torch.float64)), "x must be float32"),
    "x_strided": (dict(x=torch.randn(2, 8, 5, 10)[..., ::2]), "contiguous"),
    "weight_not_depthwise": (dict(weight=torch.randn(8, 2, 3, 3)), "weight must be"),
    "weight_channels_not_a_multiple": (dict(weight=torch.randn(12, 1, 3, 3), bias=torch.randn(12)),
                                       "not a multiple"),
    "weight_fewer_channels": (dict(weight=torch.randn(4, 1, 3, 3), bias=torch.randn(4)), "not a multiple"),
    "weight_float16": (dict(weight=torch.randn(8, 1, 3, 3).half()), "weight must be float32"),
    "bias_size": (dict(bias=torch.randn(7)), "bias must be"),
    "stride_zero": (dict(stride=[0, 1]), "stride"),
    "padding_negative": (dict(padding=[1, 1, -1, 1]), "padding"),
    "padding_two_ints": (dict(padding=[1, 1]), "padding"),
    "dilation_zero": (dict(dilation=[1, 0]), "dilation"),
    "kernel_too_big": (dict(weight=torch.randn(8, 1, 9, 9)), "does not fit"),
    "activation_unknown": (dict(activation="swish"), "unknown activation 'swish'"),
    "activation_param_not_taken": (dict(activation="relu:0.5"), "takes no parameter"),
    "activation_param_not_a_number": (dict(activation="leaky_relu:abc"), "finite number"),
    "activation_param_empty": (dict(activation="leaky_relu:"), "finite number"),
    "activation_param_nan": (dict(activation="leaky_relu:nan"), "finite number"),
}


@pytest.mark.parametrize("name", DWCONV_BAD)
def test_dwconv_bad_inputs_raise(name):
    changes, message = DWCONV_BAD[name]
    with pytest.raises(RuntimeError, match=message):
        dwconv(**_dwconv_args(**changes))


def _se_args(**changes):
    w_reduce, b_reduce, w_expand, b_expand = se_weights(8, 3, True)
    args = dict(x=torch.randn(2, 8, 5, 5), w_reduce=w_reduce, b_reduce=b_reduce, w_expand=w_expand,
                b_expand=b_expand, activation="relu", gate="hardsigmoid")
    args.update(changes)
    return args


SE_BAD = {
    "x_float64": (dict(x=torch.randn(2, 8, 5, 5, dtype=torch.float64)), "x must be float32"),
    "x_strided": (dict(x=torch.randn(2, 8, 5, 10)[..., ::2]), "contiguous"),
    "w_reduce_shape": (dict(w_reduce=torch.randn(3, 7)), "w_reduce must be"),
    "w_reduce_4d": (dict(w_reduce=torch.randn(3, 8, 1, 1)), "w_reduce must be"),
    "w_expand_shape": (dict(w_expand=torch.randn(8, 4)), "w_expand must be"),
    "w_expand_float16": (dict(w_expand=torch.randn(8, 3).half()), "w_expand must be float32"),
    "b_reduce_size": (dict(b_reduce=torch.randn(4)), "b_reduce must be"),
    "b_expand_size": (dict(b_expand=torch.randn(3)), "b_expand must be"),
    "activation": (dict(activation="tanh"), "unknown activation"),
    "activation_param": (dict(activation="hardswish:1"), "takes no parameter"),
    "gate": (dict(gate="tanh"), "unknown gate"),
}


@pytest.mark.parametrize("name", SE_BAD)
def test_squeeze_excite_bad_inputs_raise(name):
    changes, message = SE_BAD[name]
    with pytest.raises(RuntimeError, match=message):
        squeeze_excite(**_se_args(**changes))


def _dwconv_limit(x, weight, stride, padding, dilation):
    n, c, h, w = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return _C.dwconv_bn_act_limit_reason(n, c, h, w, channels_last, weight.shape[0], weight.shape[2],
                                         weight.shape[3], stride, padding, dilation)


def test_dwconv_limit_reason_is_what_the_launcher_refuses():
    x = torch.randn(1, 2, 300, 300)
    weight, bias = torch.randn(2, 1, 3, 3), torch.randn(2)
    assert _dwconv_limit(x, weight, [1, 1], [1, 1, 1, 1], [1, 1]) == ""
    wide = ([1, 1], [120, 120, 120, 120], [120, 120])  # a 241x241 halo per NCHW tile
    reason = _dwconv_limit(x, weight, *wide)
    assert "shared memory" in reason
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        dwconv(x, weight, bias, *wide, "relu")
    channels_last = x.to(memory_format=torch.channels_last)
    assert _dwconv_limit(channels_last, weight, *wide) == ""
    assert dwconv(channels_last, weight, bias, *wide, "relu").shape == (1, 2, 300, 300)
    huge = torch.empty(1, 2, 2**15, 2**15, device="meta")  # 2^31 elements in one sample
    assert "32-bit" in _dwconv_limit(huge, weight, [1, 1], [1, 1, 1, 1], [1, 1])
    assert "stride" in _dwconv_limit(x, weight, [0, 1], [1, 1, 1, 1], [1, 1])
    assert "not a multiple" in _dwconv_limit(x, torch.randn(3, 1, 3, 3), [1, 1], [1, 1, 1, 1], [1, 1])
    assert _dwconv_limit(x, torch.randn(6, 1, 3, 3), [1, 1], [1, 1, 1, 1], [1, 1]) == ""
    with pytest.raises(TypeError):
        _C.dwconv_bn_act_limit_reason(1, 2, 5, 5, False, 2, 3, 3, [1, 1], [1, 1], [1, 1])  # padding: four ints


def test_squeeze_excite_limit_reason():
    assert _C.squeeze_excite_limit_reason(2, 960, 7, 7, True, 240) == ""
    assert "32-bit" in _C.squeeze_excite_limit_reason(1, 2, 2**15, 2**15, False, 1)
    assert "32-bit" in _C.squeeze_excite_limit_reason(1, 2**16, 1, 1, True, 2**15)


# ------------------------------------------------------------------------------------ the real kernels
def _on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


@needs_gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", [
    ((3, 72, 29, 31), (3, 3), [1, 1], [1, 1, 1, 1], [1, 1], 1),
    ((3, 40, 29, 31), (5, 5), [2, 2], [1, 2, 1, 2], [1, 1], 1),
    ((2, 24, 28, 28), (7, 7), [1, 1], [3, 3, 3, 3], [1, 1], 1),
    ((8, 64, 56, 56), (3, 3), [2, 2], [0, 1, 0, 1], [1, 1], 1),
    ((2, 12, 17, 13), (4, 3), [3, 1], [0, 2, 2, 1], [2, 1], 1),
    ((2, 8, 17, 13), (3, 3), [1, 1], [1, 1, 1, 1], [1, 1], 2),
], ids=["k3s1", "k5s2_tf_same", "k7s1", "k3s2_several_pixels", "generic", "multiplier2"])
def test_dwconv_gpu_matches_emulation_and_reference(case, dtype, layout, poisoned_outputs):
    shape, kernel, stride, padding, dilation, multiplier = case
    x = random_x(shape, dtype, layout)
    weight, bias = dwconv_weights(shape[1] * multiplier, *kernel)
    emulated = dwconv(x, weight, bias, stride, padding, dilation, "gelu")
    gpu = dwconv(*_on("cuda", x, weight, bias), stride, padding, dilation, "gelu")
    torch.cuda.synchronize()
    expected_layout(gpu, layout)
    # The same fmaf sequence: only erff may differ in its last bits.
    torch.testing.assert_close(gpu.cpu(), emulated, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    assert_close_to_reference(gpu, dwconv_reference(x, weight, bias, stride, padding, dilation, "gelu"), dtype)


@needs_gpu
def test_dwconv_gpu_large(poisoned_outputs):
    x = random_x((64, 240, 28, 28), torch.float16, "channels_last", device="cuda")
    weight, bias = dwconv_weights(240, 5, 5, device="cuda")
    out = dwconv(x, weight, bias, [1, 1], [2, 2, 2, 2], [1, 1], "hardswish")
    reference = dwconv_reference(x, weight, bias, [1, 1], [2, 2, 2, 2], [1, 1], "hardswish")
    assert_close_to_reference(out, reference, torch.float16)


@needs_gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(5, 16, 7, 7, 5), (2, 24, 56, 56, 7), (1, 960, 7, 7, 240), (3, 12, 28, 28, 9),
                                   (40, 120, 7, 7, 32)], ids=lambda s: "x".join(map(str, s)))
def test_squeeze_excite_gpu_matches_emulation_and_reference(shape, dtype, layout, poisoned_outputs):
    n, c, h, w, r = shape
    x = random_x((n, c, h, w), dtype, layout)
    weights = se_weights(c, r, True)
    emulated = squeeze_excite(x, *weights, "hardswish", "sigmoid")
    gpu = squeeze_excite(*_on("cuda", x, *weights), "hardswish", "sigmoid")
    again = squeeze_excite(*_on("cuda", x, *weights), "hardswish", "sigmoid")
    assert torch.equal(gpu, again), "repeated calls must give the same bits"
    expected_layout(gpu, layout)
    torch.testing.assert_close(gpu.cpu(), emulated, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    assert_close_to_reference(gpu, se_reference(x, *weights, "hardswish", "sigmoid"), dtype)


@needs_gpu
def test_squeeze_excite_gpu_large(poisoned_outputs):
    x = random_x((256, 960, 7, 7), torch.float16, "channels_last", device="cuda")
    weights = se_weights(960, 240, True, device="cuda")
    out = squeeze_excite(x, *weights, "relu", "hardsigmoid")
    assert_close_to_reference(out, se_reference(x, *weights, "relu", "hardsigmoid"), torch.float16)


@pytest.mark.parametrize("capability, archs, expected", [
    ((9, 0), "7.5;8.0;8.6;8.9;9.0+PTX", True),
    ((8, 6), "8.0", True),            # sm_80 machine code runs on 8.6
    ((8, 0), "8.6", False),           # but not the other way round
    ((10, 0), "7.5;9.0+PTX", True),   # PTX for 9.0 is compiled by the driver for newer GPUs
    ((10, 0), "7.5;9.0", False),
    ((7, 0), "7.5;8.0+PTX", False),
])
def test_cuda_backend_knows_which_gpus_its_archs_cover(capability, archs, expected):
    from mbkernels.backends.cuda import runs_on

    assert runs_on(capability, archs) is expected
