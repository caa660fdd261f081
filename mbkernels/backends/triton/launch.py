"""How the triton backend launches its kernels: whether Triton interprets on the CPU, the interpreter's lock, and
the Launch a launcher plans (run here, compiled by the static reports). Imports nothing of this package, so the
kernel modules and the package's declaration both import it, and never each other at import time."""
import contextlib
import os
import threading
from typing import Any, NamedTuple

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_INTERPRETER_LOCK = threading.Lock()


def launch_lock():
    """Serialises kernel launches under the interpreter, which is not thread-safe; free on a GPU."""
    return _INTERPRETER_LOCK if interpreting() else contextlib.nullcontext()


class Launch(NamedTuple):
    """One kernel launch as a launcher plans it: what runs it (run_launches) and what the static sm_90 reports
    compile (benchmarks/static.py, benchmarks/blocks_static.py), so that both see exactly the same configuration."""
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
