"""The activation and gate math every Triton kernel shares.

Codes come from mbkernels.activations (the one table); kernels take the code as a constexpr, so the branch
disappears at compile time.
"""
import triton
import triton.language as tl

from ..activations import activation_code, gate_code

IDENTITY: tl.constexpr = tl.constexpr(activation_code("identity"))
RELU: tl.constexpr = tl.constexpr(activation_code("relu"))
RELU6: tl.constexpr = tl.constexpr(activation_code("relu6"))
HARDSWISH: tl.constexpr = tl.constexpr(activation_code("hardswish"))
SILU: tl.constexpr = tl.constexpr(activation_code("silu"))
SIGMOID: tl.constexpr = tl.constexpr(gate_code("sigmoid"))
HARDSIGMOID: tl.constexpr = tl.constexpr(gate_code("hardsigmoid"))


@triton.jit
def _clamp(v, low, high):
    # Comparisons rather than min/max: NaN passes through, as in torch.
    return tl.where(v < low, low, tl.where(v > high, high, v))


@triton.jit
def apply_activation(v, ACTIVATION: tl.constexpr):
    """v: float32. Matches torch's F.relu / relu6 / hardswish / silu, NaN and infinities included."""
    if ACTIVATION == RELU:
        v = tl.where(v < 0.0, 0.0, v)
    elif ACTIVATION == RELU6:
        v = _clamp(v, 0.0, 6.0)
    elif ACTIVATION == HARDSWISH:
        v = v * _clamp(v + 3.0, 0.0, 6.0) / 6.0
    elif ACTIVATION == SILU:
        v = v / (1.0 + tl.exp(-v))
    return v


@triton.jit
def apply_gate(v, GATE: tl.constexpr):
    """v: float32. Matches torch.sigmoid / F.hardsigmoid, NaN included."""
    if GATE == HARDSIGMOID:
        v = _clamp(v + 3.0, 0.0, 6.0) / 6.0
    else:
        v = 1.0 / (1.0 + tl.exp(-v))
    return v
