"""Loads the compiled extension mbkernels._C, if it is here and fits the running torch and CUDA.

Never raises: when the extension is missing, fails to load, or was built for another torch or CUDA, `C` is
None, `unavailable_reason` says why (naming both versions), a RuntimeWarning says it once, and the Triton and
reference backends serve. A library built against another torch often cannot even load ("undefined symbol"):
then the version of the installed distribution, e.g. 0.1.0+cu130.torch2.14 (see setup.py), names its build.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import warnings

import torch

FALLBACK = "the cuda backend is off and the triton/reference backends serve"


def _running() -> str:
    return f"torch {torch.__version__} with CUDA {torch.version.cuda or 'none'}"


def _minor(version: str) -> list[str]:
    return version.split("+")[0].split(".")[:2]


def _version_mismatch(module) -> str | None:
    built_torch = getattr(module, "TORCH_VERSION", "unknown")
    built_cuda = getattr(module, "CUDA_VERSION", "unknown")
    # The C++ ABI of torch holds within a minor version; CUDA runtimes within a major version.
    if _minor(built_torch) != _minor(torch.__version__) or (
        built_cuda.split(".")[0] != (torch.version.cuda or "none").split(".")[0]
    ):
        return f"mbkernels._C was built for torch {built_torch} with CUDA {built_cuda}, but {_running()} is running"
    return None


def installed_build() -> str | None:
    """What the installed mbkernels distribution says its extension was built for, or None when unknown."""
    try:
        version = importlib.metadata.version("mbkernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    match = re.fullmatch(r"[^+]+\+cu(\d+)(\d)\.torch(\d+\.\d+)", version)
    if match is None:
        return None
    return f"torch {match[3]} with CUDA {match[1]}.{match[2]} (mbkernels {version})"


def _load_failure(error: BaseException) -> str:
    built = installed_build()
    if built is None:
        cause = f"{_running()} is running; an undefined symbol means it was built against another torch"
    else:
        cause = f"it was built for {built}, and {_running()} is running"
    return f"mbkernels._C failed to load ({type(error).__name__}: {error}); {cause}"


def _import_extension():
    return importlib.import_module("mbkernels._C")


def _load():
    """(the extension, None), or (None, why it is off); warns when it is off for a reason worth telling."""
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
        reason = _version_mismatch(module)
        noisy = reason is not None
        if reason is None:
            return module, None
    if noisy and not os.environ.get("MBKERNELS_QUIET"):
        warnings.warn(f"{reason}; {FALLBACK}", RuntimeWarning, stacklevel=2)
    return None, reason


C, unavailable_reason = _load()
