"""The choice of backend, made here and nowhere else.

Each (backend, op) pair is served by a module under mbkernels.backends that provides
`why_not_<op>(explicit, *args) -> str | None` (None: it can run this case; `explicit`: the backend was asked
for by name), `<op>(*args) -> Tensor`, and `unavailable_reason()` / `describe()` for the whole backend. `select` asks them in priority order
(or only the one named by the caller or MBKERNELS_BACKEND) and raises with every backend's reason when none fits.
"""
import functools
import importlib
import os
from typing import Callable, NamedTuple, Optional

BACKENDS = ("cuda", "triton", "reference")  # priority order
ENV_VAR = "MBKERNELS_BACKEND"

_MODULES = {
    ("cuda", "dwconv_bn_act"): "cuda",
    ("cuda", "squeeze_excite"): "cuda",
    ("triton", "dwconv_bn_act"): "triton_dwconv",
    ("triton", "squeeze_excite"): "triton_se",
    ("reference", "dwconv_bn_act"): "reference",
    ("reference", "squeeze_excite"): "reference",
}
# What backends() asks about availability: the module that holds the backend's shared checks.
_STATUS_MODULES = {"cuda": "cuda", "triton": "triton_common", "reference": "reference"}


class BackendStatus(NamedTuple):
    available: bool
    reason: str


@functools.lru_cache(maxsize=None)
def _module(name: str, op: str):
    return importlib.import_module(f"mbkernels.backends.{_MODULES[name, op]}")


@functools.lru_cache(maxsize=None)
def _status_module(name: str):
    return importlib.import_module(f"mbkernels.backends.{_STATUS_MODULES[name]}")


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The backend asked for by the caller, else by MBKERNELS_BACKEND, else None (pick automatically)."""
    name = backend or os.environ.get(ENV_VAR) or None
    if name is not None and name not in BACKENDS:
        source = "backend" if backend else ENV_VAR
        raise ValueError(f"unknown {source} {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def _why_not(name: str, op: str, explicit: bool, args) -> Optional[str]:
    reason = _status_module(name).unavailable_reason()
    if reason is None:
        reason = getattr(_module(name, op), f"why_not_{op}")(explicit, *args)
    return reason


def select(op: str, backend: Optional[str], *args) -> Callable:
    """The kernel of the first backend that can run `op` on these (already checked) arguments."""
    name = requested_backend(backend)
    if name is not None:
        reason = _why_not(name, op, True, args)
        if reason is not None:
            raise RuntimeError(f"the {name} backend cannot run {op} here: {reason}")
        return getattr(_module(name, op), op)
    reasons = []
    for candidate in BACKENDS:
        reason = _why_not(candidate, op, False, args)
        if reason is None:
            return getattr(_module(candidate, op), op)
        reasons.append(f"{candidate}: {reason}")
    raise RuntimeError(f"no backend can run {op} on these inputs ({'; '.join(reasons)})")


def backends() -> dict[str, BackendStatus]:
    """Each backend's availability on this machine and, where it is off, why."""
    status = {}
    for name in BACKENDS:
        module = _status_module(name)
        reason = module.unavailable_reason()
        status[name] = BackendStatus(reason is None, reason or module.describe())
    return status
