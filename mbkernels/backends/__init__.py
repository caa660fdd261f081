"""The backends, one module each, each declaring itself once as `BACKEND = Backend(...)`.

A new backend is one module in this folder: its name, priority, the devices it serves, whether it can run here,
and per op the function that runs the op's argument bundle (mbkernels._contract) and the limits it cannot pass.
Dispatch (mbkernels.dispatch) applies the device rule and the priority order; the backend module only states facts.
"""
import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch


ANY_DEVICE = "any"


def _no_limit(args) -> Optional[str]:
    return None


@dataclass(frozen=True)
class OpSupport:
    """How a backend runs one op: run(args) -> Tensor on checked, normalised arguments; limit(args) -> why this
    case is beyond the backend (None: it can run it), asked before run so dispatch can fall through; prepare, a
    faster run for a plan where the backend has one."""
    run: Callable
    limit: Callable = _no_limit
    # prepare(args) -> a function of x alone, with everything that does not depend on x's values settled once, for
    # every x of args.x's dtype, shape and strides (the fused modules' plans); None (or returning None): run(args).
    prepare: Optional[Callable] = None


@dataclass(frozen=True)
class Backend:
    name: str
    priority: int  # lower runs first when no backend is named
    devices: tuple  # device types it serves when picked automatically; ANY_DEVICE: every one
    unavailable_reason: Callable[[], Optional[str]]  # None: it can run on this machine
    describe: Callable[[], str]
    ops: Mapping[str, OpSupport]
    # Device types it serves only when asked for by name (a host emulation, an interpreter).
    opt_in_devices: tuple = ()
    # Why it cannot run on one particular device of a type it serves (None: it can).
    device_limit: Callable[[torch.device], Optional[str]] = field(default=lambda device: None)
    # Whether compiled graphs get its run function traced in place of the op (aot: an AOTInductor package is being
    # made); where not, the op stays whole in the graph (see mbkernels.ops).
    traced_in_place: Callable[[bool], bool] = field(default=lambda aot: True)


@functools.lru_cache(maxsize=None)
def declared() -> tuple:
    """Every backend module's declaration, in priority order."""
    found = []
    for module_info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        backend = getattr(module, "BACKEND", None)
        if isinstance(backend, Backend):
            found.append(backend)
    return tuple(sorted(found, key=lambda backend: backend.priority))


def names() -> tuple:
    return tuple(backend.name for backend in declared())


def get(name: str) -> Backend:
    return next(backend for backend in declared() if backend.name == name)


def proof_backend() -> str:
    """The backend the fused modules run on in proofs (and where they are built only to be measured): the one that
    serves any device and every op, so that a proof runs wherever the probe is."""
    return next(backend.name for backend in declared() if ANY_DEVICE in backend.devices)
