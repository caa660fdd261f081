"""Property tests: both ops on every kernel backend against a float64 reference, over drawn shapes (from 1 up, odd
sizes), kernel sizes, strides, paddings, dilations, dtypes, memory layouts, strided views, activations and gates.

Two profiles, picked by MBKERNELS_FUZZ_PROFILE:
  ci    (default) small shapes, few examples, derandomized: the same cases every run, about a minute here with
        Triton under its interpreter and the CUDA kernels through their host emulation;
  long  many more examples and larger shapes, randomized: for a GPU session
        (MBKERNELS_FUZZ_PROFILE=long python -m pytest tests/test_fuzz.py).
A failing example hypothesis finds is kept below as an @example, with a comment saying what it caught.
"""
import os
from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import DEVICE, KERNEL_BACKENDS, assert_close_to_reference
from mbkernels import _contract, activations, ops
from oracle import dwconv64, se64


class Profile(NamedTuple):
    settings: settings
    max_batch: int
    max_channels: int
    max_reduced: int
    max_side: int  # the largest plane side beyond what the kernel's reach needs
    max_kernel: int


_COMMON = dict(
    deadline=None,
    database=None,
    # poisoned_outputs is a global switch, the same for every example.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILES = {
    "ci": Profile(settings(max_examples=20, derandomize=True, **_COMMON), 2, 24, 8, 10, 7),
    "long": Profile(settings(max_examples=400, **_COMMON), 8, 160, 64, 80, 9),
}
PROFILE_NAME = os.environ.get("MBKERNELS_FUZZ_PROFILE", "ci")
if PROFILE_NAME not in PROFILES:
    raise ValueError(f"MBKERNELS_FUZZ_PROFILE={PROFILE_NAME!r}; expected one of {', '.join(PROFILES)}")
PROFILE = PROFILES[PROFILE_NAME]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# How x is laid out in memory: each reaches the kernels through a different normalisation in ops.py.
LAYOUTS = (
    "contiguous",
    "channels_last",
    "sliced",  # a window of a bigger tensor, every other column: no dense layout at all
    "sliced_channels_last",  # a channel window of a channels_last tensor: stride(1) == 1 but not dense
    "transposed_hw",  # H and W swapped by a view: H innermost
    "expanded_batch",  # one image broadcast over N (stride 0)
)


def make_input(shape, dtype, layout: str, generator: torch.Generator) -> torch.Tensor:
    """A random tensor of `shape` and `dtype` laid out as `layout` says (never zeros)."""
    n, c, h, w = shape

    def randn(*size):
        return torch.randn(*size, generator=generator).to(device=DEVICE, dtype=dtype)

    if layout == "contiguous":
        return randn(n, c, h, w)
    if layout == "channels_last":
        return randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        return randn(n + 1, c + 2, h + 3, 2 * w + 1)[1:, 1:c + 1, 2:h + 2, 1::2][..., :w]
    if layout == "sliced_channels_last":
        return randn(n, h, w, c + 3).permute(0, 3, 1, 2)[:, 2:c + 2]
    if layout == "transposed_hw":
        return randn(n, c, w, h).transpose(2, 3)
    if layout == "expanded_batch":
        return randn(1, c, h, w).expand(n, c, h, w)
    raise AssertionError(layout)


def make_weight(shape, weight_dtype, transposed: bool, generator: torch.Generator) -> torch.Tensor:
    """Weights as a caller may pass them: any float dtype, possibly a non-contiguous view."""
    if transposed and len(shape) >= 2:
        *lead, a, b = shape
        t = torch.randn(*lead, b, a, generator=generator).transpose(-1, -2)
    else:
        t = torch.randn(*shape, generator=generator)
    return t.to(device=DEVICE, dtype=weight_dtype)


@pytest.fixture
def dwconv_backend(backend):
    return backend


@pytest.fixture
def se_backend(backend):
    return backend


def check_output(out: torch.Tensor, reference: torch.Tensor, x: torch.Tensor, x_before: torch.Tensor) -> None:
    assert_close_to_reference(out, reference, x.dtype)
    memory_format = _contract.memory_format_of(x)
    assert out.is_contiguous(memory_format=memory_format), f"output strides {out.stride()} are not {memory_format}"
    assert torch.equal(x, x_before), "the op wrote into its input"


# ----------------------------------------------------------------------------------------------- dwconv
class DWCase(NamedTuple):
    batch: int
    channels: int
    height: int
    width: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    dtype: torch.dtype
    layout: str
    activation: str
    weight_dtype: torch.dtype
    weight_transposed: bool
    seed: int


@st.composite
def dwconv_cases(draw) -> DWCase:
    p = PROFILE
    kernel, stride, padding, dilation, sides = [], [], [], [], []
    for _ in range(2):  # H, then W: drawn independently, so non-square kernels and planes come up
        k = draw(st.integers(1, p.max_kernel))
        d = draw(st.integers(1, 3))
        pad = draw(st.integers(0, 3))
        reach = d * (k - 1) + 1
        smallest = max(1, reach - 2 * pad)  # the output must have at least one pixel
        kernel.append(k)
        dilation.append(d)
        padding.append(pad)
        stride.append(draw(st.integers(1, 3)))
        sides.append(draw(st.integers(smallest, smallest + p.max_side)))
    return DWCase(
        batch=draw(st.integers(1, p.max_batch)),
        channels=draw(st.integers(1, p.max_channels)),
        height=sides[0],
        width=sides[1],
        kernel=tuple(kernel),
        stride=tuple(stride),
        padding=tuple(padding),
        dilation=tuple(dilation),
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(LAYOUTS)),
        activation=draw(st.sampled_from(activations.ACTIVATIONS)),
        weight_dtype=draw(st.sampled_from((torch.float32, torch.float16, torch.float64))),
        weight_transposed=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def dwconv_reference(x, weight, bias, case: DWCase) -> torch.Tensor:
    # The op takes float32 weights: the reference starts from the same rounding.
    return dwconv64(x, weight.float(), bias.float(), case.stride, case.padding, case.dilation, case.activation)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@PROFILE.settings
@given(case=dwconv_cases())
# More channels than one channels_last tile (up to 128 under the interpreter, 64 on a GPU) holds.
@example(case=DWCase(1, 131, 3, 5, (3, 3), (1, 1), (1, 1), (1, 1), torch.float16, "channels_last", "hardswish",
                     torch.float32, False, 1))
# More output pixels than one NCHW tile (4096 under the interpreter, 256 on a GPU) holds, stride 2, 5x5.
@example(case=DWCase(1, 3, 133, 127, (5, 5), (2, 1), (2, 2), (1, 1), torch.float32, "contiguous", "relu6",
                     torch.float32, False, 2))
# 1x1 planes, the kernel reaching only padding around the single pixel.
@example(case=DWCase(2, 1, 1, 1, (7, 7), (1, 1), (3, 3), (1, 1), torch.bfloat16, "sliced", "silu",
                     torch.float32, True, 3))
def test_dwconv_bn_act_matches_reference(dwconv_backend, case, poisoned_outputs):
    generator = torch.Generator().manual_seed(case.seed)
    x = make_input((case.batch, case.channels, case.height, case.width), case.dtype, case.layout, generator)
    weight = make_weight((case.channels, 1, *case.kernel), case.weight_dtype, case.weight_transposed, generator)
    bias = make_weight((case.channels,), case.weight_dtype, False, generator)
    x_before = x.clone()

    out = ops.dwconv_bn_act(x, weight, bias, case.stride, case.padding, case.dilation, case.activation,
                            dwconv_backend)

    check_output(out, dwconv_reference(x, weight, bias, case), x, x_before)


# ---------------------------------------------------------------------------------------- squeeze-excite
class SECase(NamedTuple):
    batch: int
    channels: int
    reduced: int
    height: int
    width: int
    dtype: torch.dtype
    layout: str
    activation: str
    gate: str
    reduce_bias: bool
    expand_bias: bool
    conv_weights: bool  # [R, C, 1, 1] / [C, R, 1, 1] as a 1x1 Conv2d holds them, else matrices
    weight_transposed: bool
    seed: int


@st.composite
def se_cases(draw) -> SECase:
    p = PROFILE
    return SECase(
        batch=draw(st.integers(1, p.max_batch)),
        channels=draw(st.integers(1, p.max_channels)),
        reduced=draw(st.integers(1, p.max_reduced)),
        height=draw(st.integers(1, p.max_side)),
        width=draw(st.integers(1, p.max_side)),
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(LAYOUTS)),
        activation=draw(st.sampled_from(activations.ACTIVATIONS)),
        gate=draw(st.sampled_from(activations.GATES)),
        reduce_bias=draw(st.booleans()),
        expand_bias=draw(st.booleans()),
        conv_weights=draw(st.booleans()),
        weight_transposed=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def se_reference(x, w_reduce, b_reduce, w_expand, b_expand, case: SECase) -> torch.Tensor:
    # The op takes float32 weights: the reference starts from the same rounding.
    weights = [None if t is None else t.float() for t in (w_reduce, b_reduce, w_expand, b_expand)]
    return se64(x, *weights, case.activation, case.gate)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@PROFILE.settings
@given(case=se_cases())
# More channels than one tile, channels_last, a 1x1 plane (the mean is the pixel itself).
@example(case=SECase(2, 131, 9, 1, 1, torch.float16, "channels_last", "relu", "hardsigmoid", True, True, True,
                     False, 1))
# A plane of more than 4096 pixels (the pooling must loop over pixel tiles), C = 1, R = 1, no biases.
@example(case=SECase(1, 1, 1, 67, 65, torch.float32, "contiguous", "silu", "sigmoid", False, False, False,
                     False, 2))
def test_squeeze_excite_matches_reference(se_backend, case, poisoned_outputs):
    generator = torch.Generator().manual_seed(case.seed)
    c, r = case.channels, case.reduced
    x = make_input((case.batch, c, case.height, case.width), case.dtype, case.layout, generator)
    tail = (1, 1) if case.conv_weights else ()
    w_reduce = make_weight((r, c, *tail), torch.float32, case.weight_transposed, generator)
    w_expand = make_weight((c, r, *tail), torch.float32, case.weight_transposed, generator)
    b_reduce = make_weight((r,), torch.float32, False, generator) if case.reduce_bias else None
    b_expand = make_weight((c,), torch.float32, False, generator) if case.expand_bias else None
    x_before = x.clone()

    out = ops.squeeze_excite(x, w_reduce, b_reduce, w_expand, b_expand, case.activation, case.gate, se_backend)

    check_output(out, se_reference(x, w_reduce, b_reduce, w_expand, b_expand, case), x, x_before)
