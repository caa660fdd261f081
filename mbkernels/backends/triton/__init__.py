"""The triton backend: its declaration, availability and launch rules (importable without triton; the kernels are
in dwconv.py, squeeze_excite.py and inverted_residual.py, imported on first use)."""
import contextlib
import os
import threading
from typing import Any, NamedTuple

import torch

from .. import Backend, OpSupport


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason():
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error})"
    if not hasattr(torch.library, "wrap_triton"):
        return f"torch {torch.__version__} has no torch.library.wrap_triton (torch 2.6 or newer has)"
    if not interpreting() and not torch.cuda.is_available():
        return "no CUDA GPU (set TRITON_INTERPRET=1 before importing mbkernels to run the Triton kernels on the CPU)"
    return None


def describe() -> str:
    import triton

    where = "the CPU interpreter (TRITON_INTERPRET=1)" if interpreting() else "CUDA GPUs"
    return f"triton {triton.__version__} on {where}"


_INTERPRETER_LOCK = threading.Lock()


def launch_lock():
    """Serialises kernel launches under the interpreter, which is not thread-safe; free on a GPU."""
    return _INTERPRETER_LOCK if interpreting() else contextlib.nullcontext()


class Launch(NamedTuple):
    """One kernel launch as a launcher plans it: what runs it (run_launches) and what the static sm_90 report
    compiles (benchmarks/static.py), so that both see exactly the same configuration."""
    kernel: Any  # a @triton.jit function
    grid: tuple
    args: tuple  # tensors and scalars, in the kernel's order
    constexprs: dict  # constexpr arguments and launch options (num_warps, num_stages)


def run_launches(launches, device) -> None:
    # Triton launches on the current device (device_of is a no-op for CPU tensors). wrap_triton makes the launch
    # traceable (torch.compile, export); under the interpreter the kernel is called directly: there triton.jit
    # returns an InterpretedFunction, which older torch (2.11) rejects ("wrap_triton only works on functions
    # annotated with triton.jit or triton.autotune"), and nothing traces CPU interpreter launches.
    with torch.cuda.device_of(device), launch_lock():
        for launch in launches:
            kernel = launch.kernel if interpreting() else torch.library.wrap_triton(launch.kernel)
            kernel[launch.grid](*launch.args, **launch.constexprs)


def _dwconv_bn_act(args):
    from .dwconv import launch

    return launch(args)


def _squeeze_excite(args):
    from .squeeze_excite import launch

    return launch(args)


def _squeeze_excite_limit(args):
    from .squeeze_excite import limit

    return limit(args)


def _inverted_residual(args):
    from .inverted_residual import launch

    return launch(args)


def _inverted_residual_limit(args):
    from .inverted_residual import limit

    return limit(args)


# Under the interpreter Triton runs CPU tensors (when asked for by name), on a GPU CUDA tensors.
BACKEND = Backend(
    name="triton",
    priority=20,
    devices=() if interpreting() else ("cuda",),
    opt_in_devices=("cpu",) if interpreting() else (),
    unavailable_reason=unavailable_reason,
    describe=describe,
    ops={"dwconv_bn_act": OpSupport(_dwconv_bn_act),
         "squeeze_excite": OpSupport(_squeeze_excite, _squeeze_excite_limit),
         "inverted_residual": OpSupport(_inverted_residual, _inverted_residual_limit)},
)
