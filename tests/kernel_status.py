"""Skips, with the reason, the tests of a kernel or API that has not landed yet (a placeholder or a missing module).

Anything else a probe raises is a real failure and propagates.
"""
import functools

import pytest
import torch

import mbkernels
from conftest import DEVICE
from mbkernels import ops

# What a piece that has not landed looks like: the placeholder kernels' TORCH_CHECK, a missing backend module.
_PLACEHOLDER_MESSAGE = "not implemented"


def _probe(backend: str, op: str) -> None:
    x = torch.randn(1, 2, 3, 3, device=DEVICE)
    if op == "dwconv_bn_act":
        ops.dwconv_bn_act(x, torch.randn(2, 1, 3, 3, device=DEVICE), torch.randn(2, device=DEVICE), backend=backend)
    else:
        w_reduce, w_expand = torch.randn(1, 2, device=DEVICE), torch.randn(2, 1, device=DEVICE)
        ops.squeeze_excite(x, w_reduce, None, w_expand, None, backend=backend)


@functools.lru_cache(maxsize=None)
def _not_landed_reason(backend: str, op: str):
    try:
        _probe(backend, op)
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("mbkernels."):
            return f"{error.name} has not landed"
        raise
    except RuntimeError as error:
        if str(error).strip() == _PLACEHOLDER_MESSAGE:
            return f"the {backend} {op} kernel is still a placeholder ({_PLACEHOLDER_MESSAGE!r})"
        raise
    return None


def skip_unless_landed(backend: str, op: str) -> None:
    """Skip the calling test when `backend`'s `op` kernel is a placeholder or missing (probed once)."""
    if backend == "reference":
        return
    reason = _not_landed_reason(backend, op)
    if reason is not None:
        pytest.skip(reason)


def require_api(name: str, module=mbkernels):
    """The public attribute `name` of `module` (mbkernels.patch, mbkernels.nn.SqueezeExcite...), or skip."""
    value = getattr(module, name, None)
    if value is None:
        pytest.skip(f"{module.__name__}.{name} has not landed")
    return value
