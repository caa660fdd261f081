"""The cuda backend's own kernels (csrc/): every kernel path, checked through the host emulation without a GPU.

On CPU tensors the native ops `mbkernels::*_cuda` run the very CUDA kernel code on the host (the same plans,
tiles, vector paths, halos and tails), so these tests cover the kernels' logic here; on a GPU the real kernels
are also held to the emulation and to the float64 reference. Paths: dwconv channels_last fast <K, S> (16-byte
vectors), generic vectorized and scalar (C not a multiple of the vector width, or misaligned x); NCHW tiled fast
<K, S> and generic; squeeze-excite pool (NCHW / channels_last, vectorized / scalar), mlp, scale.
"""
import time
import zlib

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_GPU, TOLERANCE, assert_close_to_reference, backend_unavailable
from mbkernels import _native, activations, ops

pytestmark = pytest.mark.skipif(
    backend_unavailable("cuda") is not None, reason=f"cuda backend unavailable: {backend_unavailable('cuda')}"
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU to run the real kernels")


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
def dwconv_weights(channels, kh, kw, device="cpu"):
    weight = torch.randn(channels, 1, kh, kw, device=device) / (kh * kw) ** 0.5
    return weight, torch.randn(channels, device=device) * 0.5


def dwconv_reference(x, weight, bias, stride, padding, dilation, activation):
    y = F.conv2d(x.double(), weight.double(), bias.double(), stride, padding, dilation, groups=x.shape[1])
    return activations.apply_activation(activation, y)


def check_dwconv(shape, kernel, stride, padding, dilation, activation, dtype, layout):
    x = random_x(shape, dtype, layout)
    weight, bias = dwconv_weights(shape[1], *kernel)
    out = ops.dwconv_bn_act(x, weight, bias, stride, padding, dilation, activation, backend="cuda")
    assert_close_to_reference(out, dwconv_reference(x, weight, bias, stride, padding, dilation, activation), dtype)
    expected_layout(out, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("channels", [7, 72])  # channels_last: scalar fallback, 16-byte vectors
@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2])
def test_dwconv_fast_paths(kernel_size, stride, channels, dtype, layout, poisoned_outputs):
    activation = activations.ACTIVATIONS[(kernel_size + stride + channels) % len(activations.ACTIVATIONS)]
    check_dwconv((2, channels, 15, 17), (kernel_size, kernel_size), [stride] * 2, [kernel_size // 2] * 2, [1, 1],
                 activation, dtype, layout)


GENERIC_SHAPES = {
    # name: (kernel, stride, padding, dilation)
    "k1": ((1, 1), [1, 1], [0, 0], [1, 1]),
    "k4_even": ((4, 4), [1, 1], [2, 1], [1, 1]),
    "k9": ((9, 9), [1, 1], [4, 4], [1, 1]),
    "k3_dilation2": ((3, 3), [1, 1], [2, 2], [2, 2]),
    "k3x5_asymmetric_padding": ((3, 5), [1, 2], [0, 3], [1, 1]),
    "k3_stride3": ((3, 3), [3, 3], [1, 1], [1, 1]),
    "k5_stride2x1_dilation3x1": ((5, 5), [2, 1], [1, 2], [3, 1]),
    "k3_no_padding": ((3, 3), [1, 1], [0, 0], [1, 1]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("channels", [12, 16])
@pytest.mark.parametrize("name", GENERIC_SHAPES)
def test_dwconv_generic_path(name, channels, dtype, layout, poisoned_outputs):
    kernel, stride, padding, dilation = GENERIC_SHAPES[name]
    activation = activations.ACTIVATIONS[(len(name) + channels) % len(activations.ACTIVATIONS)]
    check_dwconv((2, channels, 15, 17), kernel, stride, padding, dilation, activation, dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels", [1, 120])
@pytest.mark.parametrize("plane", [(1, 1), (7, 7), (56, 56), (3, 40)], ids=str)
@pytest.mark.parametrize("kernel_size, stride", [(3, 1), (5, 2)])
def test_dwconv_planes(kernel_size, stride, plane, channels, layout, poisoned_outputs):
    check_dwconv((1, channels, *plane), (kernel_size, kernel_size), [stride] * 2, [kernel_size // 2] * 2, [1, 1],
                 "hardswish", torch.float16, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
def test_dwconv_activations(activation, layout, poisoned_outputs):
    for kernel in ((3, 3), (2, 3)):  # a fast and a generic path
        check_dwconv((3, 8, 9, 10), kernel, [1, 1], [1, 1], [1, 1], activation, torch.float32, layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_dwconv_misaligned_channels_last_takes_the_scalar_path(dtype, poisoned_outputs):
    """A channels_last x whose data starts off a 16-byte boundary cannot use vector loads."""
    shape, channels = (2, 16, 9, 11), 16
    storage = torch.randn(2 * 16 * 9 * 11 + 1).to(dtype)
    strides = (16 * 9 * 11, 1, 11 * 16, 16)
    x = torch.as_strided(storage, shape, strides, storage_offset=1)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16 != 0
    weight, bias = dwconv_weights(channels, 3, 3)
    out = torch.ops.mbkernels.dwconv_bn_act_cuda(x, weight, bias, [1, 1], [1, 1], [1, 1], "relu6")
    assert_close_to_reference(out, dwconv_reference(x, weight, bias, [1, 1], [1, 1], [1, 1], "relu6"), dtype)


def test_dwconv_emulation_is_fast_enough():
    """The emulation runs compiled kernel code: a 2x72x112x112 layer takes well under a second per layout."""
    weight, bias = dwconv_weights(72, 3, 3)
    for layout in LAYOUTS:
        x = random_x((2, 72, 112, 112), torch.float16, layout)
        start = time.perf_counter()
        out = torch.ops.mbkernels.dwconv_bn_act_cuda(x, weight, bias, [1, 1], [1, 1], [1, 1], "hardswish")
        elapsed = time.perf_counter() - start
        assert_close_to_reference(out, dwconv_reference(x, weight, bias, 1, 1, 1, "hardswish"), torch.float16)
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
    hidden = activations.apply_activation(activation, F.linear(pooled, double(w_reduce), double(b_reduce)))
    scale = activations.apply_gate(gate, F.linear(hidden, double(w_expand), double(b_expand)))
    return x.double() * scale[:, :, None, None]


SE_SHAPES = [
    # (N, C, H, W, R)
    (1, 8, 1, 1, 3),
    (5, 16, 7, 7, 5),      # small planes, many per pool block; NCHW scalar (49 not a multiple of the vector)
    (2, 24, 56, 56, 7),    # big planes: split over several pool blocks
    (5, 72, 15, 17, 19),   # odd plane
    (1, 120, 14, 14, 33),
    (1, 960, 7, 7, 241),   # channels_last: many channel vectors per block
    (2, 1280, 1, 1, 321),
    (3, 12, 28, 28, 9),    # channels_last float16: C not a multiple of 8
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_squeeze_excite(shape, dtype, layout, poisoned_outputs):
    n, c, h, w, r = shape
    with_bias = (n + c) % 2 == 0
    activation, gate = [("relu", "hardsigmoid"), ("silu", "sigmoid")][(c + h) % 2]
    x = random_x((n, c, h, w), dtype, layout)
    weights = se_weights(c, r, with_bias)
    out = ops.squeeze_excite(x, *weights, activation, gate, backend="cuda")
    assert_close_to_reference(out, se_reference(x, *weights, activation, gate), dtype)
    expected_layout(out, layout)
    again = ops.squeeze_excite(x, *weights, activation, gate, backend="cuda")
    assert torch.equal(out, again), "repeated calls must give the same bits"


def test_squeeze_excite_misaligned_x_takes_the_scalar_path(poisoned_outputs):
    storage = torch.randn(2 * 16 * 8 * 8 + 1).to(torch.float16)
    x = torch.as_strided(storage, (2, 16, 8, 8), (16 * 64, 64, 8, 1), storage_offset=1)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    weights = se_weights(16, 5, True)
    out = torch.ops.mbkernels.squeeze_excite_cuda(x, *weights, "relu", "hardsigmoid")
    assert_close_to_reference(out, se_reference(x, *weights, "relu", "hardsigmoid"), torch.float16)


# -------------------------------------------------------------------------------------- the op contracts
def test_activation_tables_match_python():
    assert tuple(_native.C.ACTIVATIONS) == activations.ACTIVATIONS
    assert tuple(_native.C.GATES) == activations.GATES


def test_empty_batch_gives_empty_outputs():
    x = torch.randn(0, 8, 5, 5)
    weight, bias = dwconv_weights(8, 3, 3)
    out = torch.ops.mbkernels.dwconv_bn_act_cuda(x, weight, bias, [2, 2], [1, 1], [1, 1], "relu")
    assert out.shape == (0, 8, 3, 3)
    out = torch.ops.mbkernels.squeeze_excite_cuda(x, *se_weights(8, 3, True), "relu", "sigmoid")
    assert out.shape == (0, 8, 5, 5)


def _dwconv_args(**changes):
    args = dict(x=torch.randn(2, 8, 5, 5), weight=torch.randn(8, 1, 3, 3), bias=torch.randn(8), stride=[1, 1],
                padding=[1, 1], dilation=[1, 1], activation="relu")
    args.update(changes)
    return args


DWCONV_BAD = {
    "x_3d": (dict(x=torch.randn(8, 5, 5)), r"x must be \[N, C, H, W\]"),
    "x_int": (dict(x=torch.ones(2, 8, 5, 5, dtype=torch.int32)), "x must be float32"),
    "x_float64": (dict(x=torch.randn(2, 8, 5, 5, dtype=torch.float64)), "x must be float32"),
    "x_strided": (dict(x=torch.randn(2, 8, 5, 10)[..., ::2]), "contiguous"),
    "weight_not_depthwise": (dict(weight=torch.randn(8, 2, 3, 3)), "weight must be"),
    "weight_channels": (dict(weight=torch.randn(4, 1, 3, 3)), "weight must be"),
    "weight_float16": (dict(weight=torch.randn(8, 1, 3, 3).half()), "weight must be float32"),
    "weight_not_contiguous": (dict(weight=torch.randn(8, 1, 3, 6)[..., ::2]), "weight must be contiguous"),
    "bias_size": (dict(bias=torch.randn(7)), "bias must be"),
    "stride_zero": (dict(stride=[0, 1]), "stride"),
    "padding_negative": (dict(padding=[-1, 1]), "padding"),
    "dilation_zero": (dict(dilation=[1, 0]), "dilation"),
    "kernel_too_big": (dict(weight=torch.randn(8, 1, 9, 9)), "does not fit"),
    "activation": (dict(activation="gelu"), "unknown activation"),
}


@pytest.mark.parametrize("name", DWCONV_BAD)
def test_dwconv_bad_inputs_raise(name):
    changes, message = DWCONV_BAD[name]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.mbkernels.dwconv_bn_act_cuda(**_dwconv_args(**changes))


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
    "activation": (dict(activation="hardswish"), "unknown activation"),
    "gate": (dict(gate="tanh"), "unknown gate"),
}


@pytest.mark.parametrize("name", SE_BAD)
def test_squeeze_excite_bad_inputs_raise(name):
    changes, message = SE_BAD[name]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.mbkernels.squeeze_excite_cuda(**_se_args(**changes))


# ------------------------------------------------------------------------------------ the real kernels
def _on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


@needs_gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", [
    ((3, 72, 29, 31), (3, 3), [1, 1], [1, 1], [1, 1]),
    ((3, 40, 29, 31), (5, 5), [2, 2], [2, 2], [1, 1]),
    ((2, 24, 28, 28), (7, 7), [1, 1], [3, 3], [1, 1]),
    ((2, 12, 17, 13), (4, 3), [3, 1], [0, 2], [2, 1]),
], ids=["k3s1", "k5s2", "k7s1", "generic"])
def test_dwconv_gpu_matches_emulation_and_reference(case, dtype, layout, poisoned_outputs):
    shape, kernel, stride, padding, dilation = case
    x = random_x(shape, dtype, layout)
    weight, bias = dwconv_weights(shape[1], *kernel)
    emulated = torch.ops.mbkernels.dwconv_bn_act_cuda(x, weight, bias, stride, padding, dilation, "silu")
    gpu = torch.ops.mbkernels.dwconv_bn_act_cuda(*_on("cuda", x, weight, bias), stride, padding, dilation, "silu")
    torch.cuda.synchronize()
    expected_layout(gpu, layout)
    # The same fmaf sequence: only expf may differ in its last bits.
    torch.testing.assert_close(gpu.cpu(), emulated, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    assert_close_to_reference(gpu, dwconv_reference(x, weight, bias, stride, padding, dilation, "silu"), dtype)


@needs_gpu
def test_dwconv_gpu_large(poisoned_outputs):
    x = random_x((64, 240, 28, 28), torch.float16, "channels_last", device="cuda")
    weight, bias = dwconv_weights(240, 5, 5, device="cuda")
    out = ops.dwconv_bn_act(x, weight, bias, 1, 2, 1, "hardswish", backend="cuda")
    assert_close_to_reference(out, dwconv_reference(x, weight, bias, 1, 2, 1, "hardswish"), torch.float16)


@needs_gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(5, 16, 7, 7, 5), (2, 24, 56, 56, 7), (1, 960, 7, 7, 241), (3, 12, 28, 28, 9)],
                         ids=lambda s: "x".join(map(str, s)))
def test_squeeze_excite_gpu_matches_emulation_and_reference(shape, dtype, layout, poisoned_outputs):
    n, c, h, w, r = shape
    x = random_x((n, c, h, w), dtype, layout)
    weights = se_weights(c, r, True)
    emulated = torch.ops.mbkernels.squeeze_excite_cuda(x, *weights, "silu", "sigmoid")
    gpu = torch.ops.mbkernels.squeeze_excite_cuda(*_on("cuda", x, *weights), "silu", "sigmoid")
    again = torch.ops.mbkernels.squeeze_excite_cuda(*_on("cuda", x, *weights), "silu", "sigmoid")
    assert torch.equal(gpu, again), "repeated calls must give the same bits"
    expected_layout(gpu, layout)
    torch.testing.assert_close(gpu.cpu(), emulated, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    assert_close_to_reference(gpu, se_reference(x, *weights, "silu", "sigmoid"), dtype)


@needs_gpu
def test_squeeze_excite_gpu_large(poisoned_outputs):
    x = random_x((64, 240, 28, 28), torch.float16, "channels_last", device="cuda")
    weights = se_weights(240, 61, True, device="cuda")
    out = ops.squeeze_excite(x, *weights, "relu", "hardsigmoid", backend="cuda")
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


def test_cuda_backend_declines_what_its_launcher_refuses():
    """The launcher's limits are declared up front, so automatic dispatch falls through to another backend."""
    from mbkernels.backends import cuda

    x = torch.randn(1, 2, 300, 300)
    weight, bias = torch.randn(2, 1, 3, 3), torch.randn(2)
    wide = ([1, 1], [120, 120], [120, 120])  # stride, padding, dilation: a 241x241 halo per NCHW tile
    assert "shared memory" in cuda.why_not_dwconv_bn_act(True, x, weight, bias, *wide, "relu")
    channels_last = x.to(memory_format=torch.channels_last)
    assert cuda.why_not_dwconv_bn_act(True, channels_last, weight, bias, *wide, "relu") is None
    huge = torch.empty(1, 2, 2**15, 2**15, device="meta")  # 2^31 elements in one sample
    assert "32-bit" in cuda.dwconv_limit_reason(huge, weight, [1, 1], [1, 1], [1, 1])
    assert "32-bit" in cuda.squeeze_excite_limit_reason(huge, torch.randn(1, 2))
    assert cuda.squeeze_excite_limit_reason(x, torch.randn(1, 2)) is None
