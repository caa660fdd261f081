"""The triton backend's availability and device rules (importable without triton; the math is in triton_math)."""
import contextlib
import os
import threading

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason():
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error})"
    if not (hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")):
        return f"torch {torch.__version__} has no torch.library.triton_op (torch 2.6 or newer has)"
    if not interpreting() and not torch.cuda.is_available():
        return "no CUDA GPU (set TRITON_INTERPRET=1 before importing mbkernels to run the Triton kernels on the CPU)"
    return None


def describe() -> str:
    import triton

    where = "the CPU interpreter (TRITON_INTERPRET=1)" if interpreting() else "CUDA GPUs"
    return f"triton {triton.__version__} on {where}"


def why_not_device(explicit, x):
    if x.is_cuda:
        return "TRITON_INTERPRET=1 is set: Triton runs CPU tensors only" if interpreting() else None
    if x.device.type == "cpu" and interpreting():
        return None if explicit else "CPU tensors run the Triton interpreter only when triton is asked for by name"
    return f"x is on {x.device.type}; the triton backend runs CUDA tensors (or CPU ones under TRITON_INTERPRET=1)"



_INTERPRETER_LOCK = threading.Lock()


def launch_lock():
    """Serialises kernel launches under the interpreter, which is not thread-safe; free on a GPU."""
    return _INTERPRETER_LOCK if interpreting() else contextlib.nullcontext()


def keep_opaque_when_interpreting(op, fake) -> None:
    """Under the interpreter, make a triton_op behave like a custom op with a fake kernel.

    A triton_op gets its fake kernel, and torch.compile its graph, by tracing through the launcher; the interpreter
    runs kernels eagerly on real CPU tensors and would be handed the fake tensors of tracing. So when interpreting,
    the op stays whole: `fake` allocates its output and functionalization passes it through unchanged.
    """
    if not interpreting():
        return
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    op.register_fake(fake)

    @op.register_torch_dispatch(FunctionalTensorMode)
    def _(mode, func, types, args, kwargs):
        return mode.__torch_dispatch__(func, types, args, kwargs)
