"""Loads the compiled extension mbkernels._C, if it is here and can serve the running torch and CUDA.

mbkernels._C is built against PyTorch's stable ABI of torch NATIVE_TORCH_FLOOR (its TORCH_TARGET_VERSION): one
build loads under every torch from that version on, whichever torch built it, and under no older one, which lacks
the stable-ABI functions it calls; so an older torch is refused before the library is loaded. Its CUDA runtime is
that of one CUDA major version, which must be the running torch's.

Never raises: when the extension is missing, fails to load, or cannot serve the running torch or CUDA, `C` is
None, `unavailable_reason` says why, a RuntimeWarning says it once, and the Triton and reference backends serve.
The version of the installed distribution, e.g. 0.1.0+cu130 (see setup.py), names the CUDA of its build.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import warnings

import torch

from ._version import NATIVE_TORCH_FLOOR

FALLBACK = "the cuda backend is off and the triton/reference backends serve"
# The public ops mbkernels._C defines (csrc/public_ops.cpp): inference ops, with no derivative.
PUBLIC_OPS = ("dwconv_bn_act", "squeeze_excite")


def _running() -> str:
    return f"torch {torch.__version__} with CUDA {torch.version.cuda or 'none'}"


def _minor(version: str) -> tuple[int, int]:
    """'2.14.1+cu130' or '2.15.0a0+git1234' -> (2, 14)."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def _torch_too_old() -> str | None:
    if _minor(torch.__version__) >= _minor(NATIVE_TORCH_FLOOR):
        return None
    return (f"mbkernels._C needs torch >= {NATIVE_TORCH_FLOOR} (it is built against the stable ABI of torch "
            f"{NATIVE_TORCH_FLOOR}), but {_running()} is running")


def _cuda_mismatch(module) -> str | None:
    if not hasattr(module, "TORCH_TARGET_VERSION"):  # a build of an older mbkernels left beside the new one
        return (f"{module.__file__} is a build of an older mbkernels (not on the stable ABI); delete it and "
                f"reinstall mbkernels")
    built_cuda = getattr(module, "CUDA_VERSION", "unknown")
    # A CUDA runtime serves its own major version.
    if built_cuda.split(".")[0] != (torch.version.cuda or "none").split(".")[0]:
        return f"mbkernels._C was built for CUDA {built_cuda}, but {_running()} is running"
    return None


def installed_build() -> str | None:
    """What the installed mbkernels distribution says its extension was built for, or None when unknown."""
    try:
        version = importlib.metadata.version("mbkernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    match = re.fullmatch(r"[^+]+\+cu(\d+)(\d)", version)
    if match is None:
        return None
    return f"CUDA {match[1]}.{match[2]} (mbkernels {version})"


def _load_failure(error: BaseException) -> str:
    built = installed_build()
    cause = f"{_running()} is running" if built is None else f"it was built for {built}, and {_running()} is running"
    return f"mbkernels._C failed to load ({type(error).__name__}: {error}); {cause}"


def _import_extension():
    return importlib.import_module("mbkernels._C")


def _refuse_backward() -> None:
    """Backward through the public ops fails, naming the op: the stable ABI registers no autograd kernel (the
    fused modules run the stock layers when gradients are needed). Called whenever the library was imported, even one
    that cannot serve (its schemas are defined all the same, and without this, torch < 2.11 only warns and returns no
    gradient). Once per process: a reload keeps it."""

    def backward(op):
        def refuse(ctx, *grads):
            raise RuntimeError(f"the derivative for mbkernels::{op} is not implemented (an inference op)")

        return refuse

    for op in PUBLIC_OPS:
        qualname = f"mbkernels::{op}"
        defined = hasattr(torch.ops.mbkernels, op)
        if defined and not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd"):
            torch.library.register_autograd(qualname, backward(op), setup_context=lambda ctx, inputs, output: None)


def _load():
    """(the extension, None), or (None, why it is off); warns when it is off for a reason worth telling."""
    reason = _torch_too_old()
    if reason is not None:
        noisy = True
    else:
        try:
            module = _import_extension()
        except ModuleNotFoundError as error:
            if error.name == "mbkernels._C":
                reason = "mbkernels._C was not built (no CUDA toolkit at install time, or MBKERNELS_SKIP_CUDA_BUILD=1)"
                noisy = torch.cuda.is_available()  # a pure-Python install is expected where there is no GPU
            else:
                reason, noisy = _load_failure(error), True
        except Exception as error:  # noqa: BLE001  importing mbkernels must never fail because of its extension
            reason, noisy = _load_failure(error), True
        else:
            _refuse_backward()
            reason = _cuda_mismatch(module)
            noisy = reason is not None
            if reason is None:
                return module, None
    if noisy and not os.environ.get("MBKERNELS_QUIET"):
        warnings.warn(f"{reason}; {FALLBACK}", RuntimeWarning, stacklevel=2)
    return None, reason


C, unavailable_reason = _load()
