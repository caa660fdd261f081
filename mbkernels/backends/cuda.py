"""The cuda backend: the C++/CUDA kernels of mbkernels._C (csrc/).

The native ops `mbkernels::dwconv_bn_act_cuda` and `mbkernels::squeeze_excite_cuda` are defined in
csrc/registration.cpp. Their CPU kernels run the same CUDA kernel code on the host (an emulation, slow, for
testing the kernels' logic without a GPU): dispatch uses them only when the cuda backend is asked for by name.
What the launchers cannot run is stated once, in C++, and asked here (`_C.*_limit_reason`).
"""
import functools

import torch

from .. import _native
from .._contract import DWConvArgs, SEArgs, dwconv_bn_act_output, memory_format_of, squeeze_excite_output, tap_major
from . import Backend, OpSupport


def runs_on(capability: tuple, arch_list: str) -> bool:
    """Whether a library built for arch_list ("7.5;8.0;9.0+PTX") has code for a GPU of this compute capability:
    machine code for the same major version and a minor at or below it, or PTX for an older or equal one."""
    for entry in arch_list.replace(" ", ";").split(";"):
        if not entry:
            continue
        ptx = entry.upper().endswith("+PTX")
        major, minor = (int(part) for part in entry.upper().removesuffix("+PTX").split("."))
        if (major == capability[0] and minor <= capability[1]) or (ptx and (major, minor) <= tuple(capability)):
            return True
    return False


def describe() -> str:
    C = _native.C
    built = (f"mbkernels._C for torch >= {C.TORCH_TARGET_VERSION} (stable ABI; built with torch {C.TORCH_VERSION}), "
             f"CUDA {C.CUDA_VERSION}, archs {C.CUDA_ARCHS}")
    if not torch.cuda.is_available():
        built += " (no CUDA GPU here: asked for by name, it runs its kernels' host emulation on CPU tensors)"
    return built


@functools.lru_cache(maxsize=None)
def _device_limit_on(index: int):
    capability = torch.cuda.get_device_capability(index)
    archs = _native.C.CUDA_ARCHS
    if not runs_on(capability, archs):
        return f"cuda:{index} has compute capability {capability[0]}.{capability[1]}; mbkernels._C was built for {archs}"
    return None


def device_limit(device: torch.device):
    if device.type != "cuda":
        return None
    return _device_limit_on(device.index if device.index is not None else torch.cuda.current_device())


def _channels_last(x) -> bool:
    return memory_format_of(x) == torch.channels_last


def dwconv_bn_act_limit(args: DWConvArgs):
    kh, kw = args.weight.shape[2], args.weight.shape[3]
    return _native.C.dwconv_bn_act_limit_reason(
        *args.x.shape, _channels_last(args.x), args.out_channels, kh, kw, args.stride, args.padding, args.dilation,
    ) or None


def dwconv_bn_act(args: DWConvArgs):
    return torch.ops.mbkernels.dwconv_bn_act_cuda(*args._replace(weight=tap_major(args.weight)))


def squeeze_excite_limit(args: SEArgs):
    return _native.C.squeeze_excite_limit_reason(*args.x.shape, _channels_last(args.x), args.w_reduce.shape[0]) or None


def squeeze_excite(args: SEArgs):
    return torch.ops.mbkernels.squeeze_excite_cuda(*args)


BACKEND = Backend(
    name="cuda",
    priority=10,
    devices=("cuda",),
    opt_in_devices=("cpu",),  # the host emulation
    unavailable_reason=lambda: _native.unavailable_reason,
    describe=describe,
    ops={"dwconv_bn_act": OpSupport(dwconv_bn_act, dwconv_bn_act_limit),
         "squeeze_excite": OpSupport(squeeze_excite, squeeze_excite_limit)},
    device_limit=device_limit,
)

if _native.C is not None:

    @torch.library.register_fake("mbkernels::dwconv_bn_act_cuda")
    def _(*args):
        return dwconv_bn_act_output(DWConvArgs(*args))

    @torch.library.register_fake("mbkernels::squeeze_excite_cuda")
    def _(*args):
        return squeeze_excite_output(SEArgs(*args))
