"""mbkernels: fused GPU kernels for MobileNet-style inference.

    import mbkernels
    mbkernels.ops.dwconv_bn_act(x, weight, bias, stride=1, activation="hardswish")
    mbkernels.backend_status()  # which backends run here, and why the others don't
    mbkernels.patch(model)      # swap a model's depthwise conv + BN + act and squeeze-excite for fused modules
"""
import warnings as _warnings

import torch as _torch

from ._version import TORCH_FLOOR, below_torch_floor

if below_torch_floor(_torch.__version__):
    _warnings.warn(f"mbkernels needs torch {TORCH_FLOOR} or newer (the oldest tested), and torch "
                   f"{_torch.__version__} is installed: its custom ops, torch.compile and torch.export may fail",
                   RuntimeWarning, stacklevel=2)

from . import _native  # noqa: F401,E402  (loads mbkernels._C, or warns once and leaves it off)
from . import backends, nn, ops
from .dispatch import backend_status
from .planner import patch, patch_report, unpatch

from ._version import installed_version

__version__ = installed_version()  # e.g. 0.1.0+cu130: names the CUDA _C was built for
__all__ = ["backend_status", "backends", "nn", "ops", "patch", "patch_report", "unpatch"]
