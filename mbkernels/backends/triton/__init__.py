"""The triton backend's declaration and availability (importable without triton). The kernels are in dwconv.py,
squeeze_excite.py and inverted_residual.py, imported on first use; how they launch, in launch.py."""
import torch

from .. import Backend, OpSupport
from .launch import interpreting


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
    traced_in_place=lambda aot: not interpreting(),  # the interpreter cannot take the fake tensors of tracing
    unavailable_reason=unavailable_reason,
    describe=describe,
    ops={"dwconv_bn_act": OpSupport(_dwconv_bn_act),
         "squeeze_excite": OpSupport(_squeeze_excite, _squeeze_excite_limit),
         "inverted_residual": OpSupport(_inverted_residual, _inverted_residual_limit)},
)
