"""Loads the compiled extension mbkernels._C, if it is here and matches the running torch.

Never raises: when the library is missing, broken or built for another torch/CUDA, `C` is None,
`unavailable_reason` says why, and a warning is given once (the Triton and reference backends serve).
"""
import importlib
import os
import warnings

import torch

C = None
unavailable_reason = None


def _version_mismatch(module) -> str | None:
    built_torch = getattr(module, "TORCH_VERSION", "unknown")
    built_cuda = getattr(module, "CUDA_VERSION", "unknown")
    running_torch = torch.__version__
    running_cuda = torch.version.cuda or "none"
    # The C++ ABI is only stable within a torch minor version.
    if built_torch.split(".")[:2] != running_torch.split(".")[:2]:
        return f"mbkernels._C was built for torch {built_torch} but torch {running_torch} is running"
    if built_cuda.split(".")[:1] != running_cuda.split(".")[:1]:
        return f"mbkernels._C was built for CUDA {built_cuda} but torch runs CUDA {running_cuda}"
    return None


def _load():
    global C, unavailable_reason
    try:
        module = importlib.import_module("mbkernels._C")
    except ModuleNotFoundError as error:
        if error.name != "mbkernels._C":
            raise
        unavailable_reason = (
            "mbkernels._C was not built (no CUDA toolkit at install time, or MBKERNELS_SKIP_CUDA_BUILD=1)"
        )
        noisy = torch.cuda.is_available()
    except (ImportError, OSError) as error:
        unavailable_reason = f"mbkernels._C failed to load: {error}"
        noisy = True
    else:
        unavailable_reason = _version_mismatch(module)
        noisy = unavailable_reason is not None
        if unavailable_reason is None:
            C = module
    if noisy and not os.environ.get("MBKERNELS_QUIET"):
        warnings.warn(
            f"{unavailable_reason}; the cuda backend is off and the triton/reference backends serve",
            RuntimeWarning,
            stacklevel=3,
        )


_load()
