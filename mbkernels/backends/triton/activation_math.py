"""The activation and gate math every Triton kernel shares.

Codes come from mbkernels.activations (the one table); kernels take the code as a constexpr, so the branch
disappears at compile time.
"""
import triton
import triton.language as tl

from ...activations import ACTIVATIONS, gate_code

IDENTITY: tl.constexpr = tl.constexpr(ACTIVATIONS.index("identity"))
RELU: tl.constexpr = tl.constexpr(ACTIVATIONS.index("relu"))
RELU6: tl.constexpr = tl.constexpr(ACTIVATIONS.index("relu6"))
HARDSWISH: tl.constexpr = tl.constexpr(ACTIVATIONS.index("hardswish"))
SILU: tl.constexpr = tl.constexpr(ACTIVATIONS.index("silu"))
GELU: tl.constexpr = tl.constexpr(ACTIVATIONS.index("gelu"))
GELU_TANH: tl.constexpr = tl.constexpr(ACTIVATIONS.index("gelu_tanh"))
LEAKY_RELU: tl.constexpr = tl.constexpr(ACTIVATIONS.index("leaky_relu"))
SIGMOID: tl.constexpr = tl.constexpr(gate_code("sigmoid"))
HARDSIGMOID: tl.constexpr = tl.constexpr(gate_code("hardsigmoid"))


@triton.jit
def _clamp(v, low, high):
    # Comparisons rather than min/max: NaN passes through, as in torch.
    return tl.where(v < low, low, tl.where(v > high, high, v))


@triton.jit
def apply_activation(v, ACTIVATION: tl.constexpr, PARAMETER):
    """v: float32. Matches torch's F.relu / relu6 / hardswish / silu / gelu / leaky_relu, NaN and infinities
    included; PARAMETER: leaky_relu's negative slope (unused by the others)."""
    if ACTIVATION == RELU:
        v = tl.where(v < 0.0, 0.0, v)
    elif ACTIVATION == RELU6:
        v = _clamp(v, 0.0, 6.0)
    elif ACTIVATION == HARDSWISH:
        v = v * _clamp(v + 3.0, 0.0, 6.0) / 6.0
    elif ACTIVATION == SILU:
        v = v / (1.0 + tl.exp(-v))
    elif ACTIVATION == GELU:
        v = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif ACTIVATION == GELU_TANH:
        # tanh(u) = 1 - 2 / (exp(2u) + 1): exact at both infinities, NaN passes through.
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        v = 0.5 * v * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    elif ACTIVATION == LEAKY_RELU:
        v = tl.where(v < 0.0, v * PARAMETER, v)
    return v


@triton.jit
def apply_gate(v, GATE: tl.constexpr):
    """v: float32. Matches torch.sigmoid / F.hardsigmoid, NaN included."""
    if GATE == HARDSIGMOID:
        v = _clamp(v + 3.0, 0.0, 6.0) / 6.0
    else:
        v = 1.0 / (1.0 + tl.exp(-v))
    return v
