"""The one table of activation and gate names and their math.

An activation spec is a name, or a name and its parameter: "relu", "leaky_relu:0.2" (the negative slope; 0.01
when left out). A gate spec is a name, or a name and an affine map of the gate's input the fused modules fold
into the layer before it: "hardsigmoid:6,-3" is hardsigmoid(6 x - 3), a clamp to [0, 1] (parse_gate); the ops
take plain names. The position of a name in ACTIVATIONS / GATES is the integer code that the Triton kernels take
as a constexpr; the CUDA kernels parse the same specs (csrc/activations.cuh) and a test checks both tables agree.
"""
import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "relu", "relu6", "hardswish", "silu", "gelu", "gelu_tanh", "leaky_relu")
GATES = ("sigmoid", "hardsigmoid")
# Activations that take a parameter, and its value when the spec leaves it out (nn.LeakyReLU's default).
PARAMETER_DEFAULTS = {"leaky_relu": 0.01}

_ACTIVATION_MATH = {
    "identity": lambda t, _: t,
    "relu": lambda t, _: F.relu(t),
    "relu6": lambda t, _: F.relu6(t),
    "hardswish": lambda t, _: F.hardswish(t),
    "silu": lambda t, _: F.silu(t),
    "gelu": lambda t, _: F.gelu(t),
    "gelu_tanh": lambda t, _: F.gelu(t, approximate="tanh"),
    "leaky_relu": lambda t, slope: F.leaky_relu(t, slope),
}
# The same math in place, for a tensor the caller just made and owns (a conv's output): no second activation tensor
# is allocated and written. gelu has no in-place form.
_ACTIVATION_MATH_IN_PLACE = {
    "identity": lambda t, _: t,
    "relu": lambda t, _: t.relu_(),
    "relu6": lambda t, _: F.hardtanh_(t, 0.0, 6.0),
    "hardswish": lambda t, _: F.hardswish(t, inplace=True),
    "silu": lambda t, _: F.silu(t, inplace=True),
    "gelu": lambda t, _: F.gelu(t),
    "gelu_tanh": lambda t, _: F.gelu(t, approximate="tanh"),
    "leaky_relu": lambda t, slope: F.leaky_relu_(t, slope),
}
_GATE_MATH = {
    "sigmoid": torch.sigmoid,
    "hardsigmoid": F.hardsigmoid,
}


def _code(name: str, table: tuple, what: str) -> int:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(table)}")
    return table.index(name)


def parse_activation(spec: str) -> tuple[str, float]:
    """(name, parameter) of an activation spec; ValueError for an unknown name or a bad parameter."""
    if not isinstance(spec, str):
        raise ValueError(f"an activation is named by a string, got {type(spec).__name__}")
    if torch.compiler.is_compiling():  # traced once; a cache would only add guards
        return _parse_activation(spec)
    parsed = _PARSED.get(spec)
    if parsed is None:
        parsed = _PARSED[spec] = _parse_activation(spec)
    return parsed


_PARSED = {}  # spec -> (name, parameter): specs are parsed on every eager fused call, and the specs in use are few


def _parse_activation(spec: str) -> tuple[str, float]:
    name, _, text = spec.partition(":")
    _code(name, ACTIVATIONS, "activation")
    if not text:
        return name, PARAMETER_DEFAULTS.get(name, 0.0)
    if name not in PARAMETER_DEFAULTS:
        raise ValueError(f"activation {name!r} takes no parameter, got {spec!r}")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"activation {spec!r}: the parameter must be a finite number")
    return name, value


def gate_code(name: str) -> int:
    return _code(name, GATES, "gate")


def apply_activation(spec: str, t: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """The activation of t; in_place: overwrite t (only for a fresh tensor the caller owns)."""
    name, parameter = parse_activation(spec)
    return (_ACTIVATION_MATH_IN_PLACE if in_place else _ACTIVATION_MATH)[name](t, parameter)


def in_place(spec: str):
    """The activation of a spec as a function that overwrites its argument (see apply_activation)."""
    name, parameter = parse_activation(spec)
    math = _ACTIVATION_MATH_IN_PLACE[name]
    return lambda t: math(t, parameter)


def gate_function(name: str):
    gate_code(name)
    return _GATE_MATH[name]


def apply_gate(name: str, t: torch.Tensor) -> torch.Tensor:
    return gate_function(name)(t)


def _spec(name: str, parameter: float) -> str:
    return f"{name}:{parameter!r}" if name in PARAMETER_DEFAULTS else name


def _module_activation(module) -> "str | None":
    """The spec of a stock activation module, read from its type and settings."""
    simple = {torch.nn.Identity: "identity", torch.nn.ReLU: "relu", torch.nn.ReLU6: "relu6",
              torch.nn.Hardswish: "hardswish", torch.nn.SiLU: "silu"}
    if type(module) in simple:
        return simple[type(module)]
    if type(module) is torch.nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if type(module) is torch.nn.LeakyReLU:
        return _spec("leaky_relu", float(module.negative_slope))
    return None


def stock_module(spec: str) -> torch.nn.Module:
    """The torch.nn module that computes an activation spec (benchmarks build stock layers from it)."""
    name, parameter = parse_activation(spec)
    builders = {"identity": torch.nn.Identity, "relu": torch.nn.ReLU, "relu6": torch.nn.ReLU6,
                "hardswish": torch.nn.Hardswish, "silu": torch.nn.SiLU, "gelu": torch.nn.GELU,
                "gelu_tanh": lambda: torch.nn.GELU(approximate="tanh"),
                "leaky_relu": lambda: torch.nn.LeakyReLU(parameter)}
    return builders[name]()


GATE_MODULES = {
    torch.nn.Sigmoid: "sigmoid",
    torch.nn.Hardsigmoid: "hardsigmoid",
}

_PROBE = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)


def _probe_output(module):
    """What a parameter-free module (or a function of one tensor) computes on _PROBE, or None when it is not an
    elementwise function of it."""
    if isinstance(module, torch.nn.Module) and (any(True for _ in module.parameters())
                                                or any(True for _ in module.buffers())):
        return None
    try:
        with torch.no_grad():
            out = module(_PROBE.clone())
    except Exception:  # any failure means "not an activation we can stand in for"
        return None
    if not isinstance(out, torch.Tensor) or out.shape != _PROBE.shape:
        return None
    return out.to(torch.float64)


def _matches(out: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(out, want, rtol=1e-6, atol=1e-6)


def identify_activation(module):
    """The spec of a stock or hand-written activation module (or a function of one tensor: an expression such as
    x * torch.sigmoid(x)), or None if it computes none of the table's."""
    spec = _module_activation(module)
    if spec is not None:
        return spec
    out = _probe_output(module)
    if out is None:
        return None
    # A hand-written activation (class h_swish(nn.Module) ...): recognise it by what it computes.
    negative = _PROBE < 0
    slope = (out[negative] / _PROBE[negative]).mean().item()
    for name, fn in _ACTIVATION_MATH.items():
        parameter = slope if name in PARAMETER_DEFAULTS else 0.0
        if _matches(out, fn(_PROBE, parameter)):
            return _spec(name, parameter)
    return None


def identify_gate(module):
    """The gate spec (see parse_gate) of a stock or hand-written gate module (or a function of one tensor), or None.
    A gate of an affine map of its input is found too: PaddlePaddle's hard sigmoid relu6(1.2 x + 3) / 6 is
    "hardsigmoid:1.2,0" and a clamp to [0, 1] "hardsigmoid:6,-3"."""
    name = GATE_MODULES.get(type(module))
    if name is not None:
        return name
    out = _probe_output(module)
    if out is None:
        return None
    for name, fn in _GATE_MATH.items():
        if _matches(out, fn(_PROBE)):
            return name
    for name, fn in _GATE_MATH.items():
        affine = _fit_affine(out, _GATE_INVERSE[name])
        if affine is not None and _matches(out, fn(affine[0] * _PROBE + affine[1])):
            return _gate_spec(name, *affine)
    return None


# Each gate's inverse on the open range (0, 1), where it is one-to-one.
_GATE_INVERSE = {"sigmoid": torch.logit, "hardsigmoid": lambda y: 6.0 * y - 3.0}


def _fit_affine(out: torch.Tensor, inverse) -> "tuple[float, float] | None":
    """(scale, shift) such that inverse(out) = scale * _PROBE + shift where the gate is one-to-one (least squares
    over the probe points there), or None when fewer than three points are."""
    inside = (out > 1e-4) & (out < 1 - 1e-4)
    if int(inside.sum()) < 3:
        return None
    x, u = _PROBE[inside], inverse(out[inside])
    scale = (((x - x.mean()) * (u - u.mean())).sum() / ((x - x.mean()) ** 2).sum()).item()
    shift = (u.mean() - scale * x.mean()).item()
    # Rounded to 10 decimals (1.2 stays 1.2 and 1e-17 becomes 0 in the spec), far below float32's resolution.
    return round(scale, 10) + 0.0, round(shift, 10) + 0.0


def _gate_spec(name: str, scale: float, shift: float) -> str:
    return name if (scale, shift) == (1.0, 0.0) else f"{name}:{scale:.15g},{shift:.15g}"


def is_gate(spec: str) -> bool:
    """Whether a spec (of identify_activation or identify_gate) names a gate."""
    return spec.partition(":")[0] in GATES


def parse_gate(spec: str) -> tuple[str, float, float]:
    """(name, scale, shift) of a gate spec: a GATES name ("sigmoid"), or a gate of an affine map of its input,
    "hardsigmoid:6,-3" for hardsigmoid(6 x - 3). The fused modules fold the map into the layer before the gate (the
    ops take the names alone); ValueError for anything else."""
    if not isinstance(spec, str):
        raise ValueError(f"a gate is named by a string, got {type(spec).__name__}")
    name, _, text = spec.partition(":")
    gate_code(name)
    if not text:
        return name, 1.0, 0.0
    try:
        scale, shift = (float(v) for v in text.split(","))
    except ValueError:
        scale = shift = math.nan
    if not (math.isfinite(scale) and math.isfinite(shift)) or scale == 0.0:
        raise ValueError(f"gate {spec!r}: expected name:scale,shift with finite numbers, scale not 0")
    return name, scale, shift
