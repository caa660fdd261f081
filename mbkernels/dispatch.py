"""The choice of backend, made here and nowhere else.

Each backend declares itself (mbkernels.backends.Backend): the devices it serves, those it serves only when asked
for by name, whether it can run here, and per op its run function and limits. `select` asks them in priority order
(or only the one named by the caller or MBKERNELS_BACKEND), returns the backend it chose with that op's support,
and raises with every backend's reason when none fits.
"""
import os
from typing import Callable, NamedTuple, Optional

import torch

from . import backends as _backends
from .backends import Backend, OpSupport

ENV_VAR = "MBKERNELS_BACKEND"


class Choice(NamedTuple):
    """The backend `select` chose for an op, and how it runs that op."""
    backend: Backend
    support: OpSupport

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def run(self) -> Callable:
        return self.support.run

    @property
    def prepare(self) -> Optional[Callable]:
        return self.support.prepare


class BackendStatus(tuple):
    """One backend on this machine: (available, reason) as a pair -- it unpacks and compares as one -- plus
    `emulated`: it runs, but no device it serves for real is here (the CUDA kernels' host emulation on a machine
    without a GPU, Triton under its interpreter), so what it runs checks correctness and says nothing of speed."""

    def __new__(cls, available: bool, reason: str, emulated: bool = False):
        status = super().__new__(cls, (available, reason))
        status.emulated = emulated
        return status

    @property
    def available(self) -> bool:
        return self[0]

    @property
    def reason(self) -> str:
        return self[1]

    @property
    def state(self) -> str:
        return "emulated" if self.emulated else "available" if self.available else "unavailable"

    def __repr__(self) -> str:
        return f"BackendStatus(available={self.available}, reason={self.reason!r}, emulated={self.emulated})"


class BackendStatuses(dict):
    """backend_status(): {name: BackendStatus}, printed as a table."""

    def __str__(self) -> str:
        width = max(map(len, ["backend", *self]))
        lines = [f"{'backend':{width}}  {'state':11}  details"]
        lines += [f"{name:{width}}  {status.state:11}  {status.reason}" for name, status in self.items()]
        return "\n".join(lines)

    __repr__ = __str__


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The backend asked for by the caller, else by MBKERNELS_BACKEND, else None (pick automatically)."""
    name = backend or os.environ.get(ENV_VAR) or None
    names = _backends.names()
    if name is not None and name not in names:
        source = "backend" if backend else ENV_VAR
        raise ValueError(f"unknown {source} {name!r}; expected one of {', '.join(names)}")
    return name


def _device_reason(backend, device, explicit: bool) -> Optional[str]:
    served = device.type in backend.devices or _backends.ANY_DEVICE in backend.devices
    if served or (explicit and device.type in backend.opt_in_devices):
        return backend.device_limit(device)
    if device.type in backend.opt_in_devices:
        return f"{device.type} tensors run the {backend.name} backend only when it is asked for by name"
    served = list(backend.devices) + [f"{d} (when asked for by name)" for d in backend.opt_in_devices]
    return f"x is on {device.type}; the {backend.name} backend runs {' or '.join(served) or 'nothing here'} tensors"


def why_not(backend, op: str, args, explicit: bool) -> Optional[str]:
    """Why `backend` cannot run `op` on these (checked, normalised) arguments; None when it can."""
    support = backend.ops.get(op)
    if support is None:
        return f"it has no {op} kernel"
    return backend.unavailable_reason() or _device_reason(backend, args.x.device, explicit) or support.limit(args)


def select(op: str, backend: Optional[str], args) -> Choice:
    """The backend that runs `op` on args: the one named (by the caller or MBKERNELS_BACKEND), else the first in
    priority order that can."""
    name = requested_backend(backend)
    if name is not None:
        chosen = _backends.get(name)
        reason = why_not(chosen, op, args, explicit=True)
        if reason is not None:
            raise RuntimeError(f"the {name} backend cannot run {op} here: {reason}")
        return Choice(chosen, chosen.ops[op])
    reasons = []
    for candidate in _backends.declared():
        reason = why_not(candidate, op, args, explicit=False)
        if reason is None:
            return Choice(candidate, candidate.ops[op])
        reasons.append(f"{candidate.name}: {reason}")
    raise RuntimeError(f"no backend can run {op} on these inputs ({'; '.join(reasons)})")


def _present(device_type: str) -> bool:
    """Whether this machine has a device of this type (the reference backend's "any" is always here)."""
    if device_type in (_backends.ANY_DEVICE, "cpu"):
        return True
    return device_type == "cuda" and torch.cuda.is_available()


def backend_status() -> BackendStatuses:
    """Each backend's availability on this machine and, where it is off, why; print it for a table. A backend
    that runs only devices it serves when asked for by name (`opt_in_devices`: a host emulation, an interpreter),
    because none it serves for real is here, is available and `emulated`."""
    status = BackendStatuses()
    for backend in _backends.declared():
        reason = backend.unavailable_reason()
        emulated = reason is None and not any(map(_present, backend.devices)) and bool(backend.opt_in_devices)
        status[backend.name] = BackendStatus(reason is None, reason or backend.describe(), emulated)
    return status


def first_available(device: torch.device) -> str:
    """The backend an automatic choice prefers on device (any op): the first in priority order that runs here and
    serves device by the device rule (not by opt-in: no host emulation or interpreter)."""
    return next(backend.name for backend in _backends.declared()
                if backend.unavailable_reason() is None and _device_reason(backend, device, explicit=False) is None)


def why_not_here(name: str, device: torch.device) -> Optional[str]:
    """Why the backend named `name` cannot run on `device` on this machine when asked for by name (None: it can)."""
    backend = _backends.get(requested_backend(name))
    return backend.unavailable_reason() or _device_reason(backend, device, explicit=True)
