"""The one table of activation and gate names and their math.

The position of a name in ACTIVATIONS / GATES is the integer code that the Triton kernels take as a
constexpr; the CUDA kernels parse the same names (csrc/activations.cuh) and a test checks both tables agree.
"""
import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "relu", "relu6", "hardswish", "silu")
GATES = ("sigmoid", "hardsigmoid")
# The squeeze-excite hidden activation is a subset of ACTIVATIONS.
SE_ACTIVATIONS = ("relu", "silu")

_ACTIVATION_MATH = {
    "identity": lambda t: t,
    "relu": F.relu,
    "relu6": F.relu6,
    "hardswish": F.hardswish,
    "silu": F.silu,
}
_GATE_MATH = {
    "sigmoid": torch.sigmoid,
    "hardsigmoid": F.hardsigmoid,
}


def _code(name: str, table: tuple, what: str) -> int:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(table)}")
    return table.index(name)


def activation_code(name: str) -> int:
    return _code(name, ACTIVATIONS, "activation")


def gate_code(name: str) -> int:
    return _code(name, GATES, "gate")


def apply_activation(name: str, t: torch.Tensor) -> torch.Tensor:
    activation_code(name)
    return _ACTIVATION_MATH[name](t)


def apply_gate(name: str, t: torch.Tensor) -> torch.Tensor:
    gate_code(name)
    return _GATE_MATH[name](t)


# Stock modules that correspond to each name, for matching models.
ACTIVATION_MODULES = {
    torch.nn.Identity: "identity",
    torch.nn.ReLU: "relu",
    torch.nn.ReLU6: "relu6",
    torch.nn.Hardswish: "hardswish",
    torch.nn.SiLU: "silu",
}
GATE_MODULES = {
    torch.nn.Sigmoid: "sigmoid",
    torch.nn.Hardsigmoid: "hardsigmoid",
}


_PROBE = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)


def _identify(module, known: dict, math: dict):
    name = known.get(type(module))
    if name is not None:
        return name
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return None
    # A hand-written activation (class h_swish(nn.Module) ...): recognise it by what it computes.
    try:
        with torch.no_grad():
            out = module(_PROBE.clone())
    except Exception:  # any failure means "not an activation we can stand in for"
        return None
    if not isinstance(out, torch.Tensor) or out.shape != _PROBE.shape:
        return None
    for candidate, fn in math.items():
        if torch.allclose(out.to(torch.float64), fn(_PROBE), rtol=1e-6, atol=1e-6):
            return candidate
    return None


def identify_activation(module: torch.nn.Module):
    """The ACTIVATIONS name of a stock or hand-written activation module, or None if it computes none of them."""
    return _identify(module, ACTIVATION_MODULES, _ACTIVATION_MATH)


def identify_gate(module: torch.nn.Module):
    """The GATES name of a stock or hand-written gate module, or None."""
    return _identify(module, GATE_MODULES, _GATE_MATH)
