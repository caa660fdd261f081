"""The cuda backend: the C++/CUDA kernels of mbkernels._C (csrc/).

The native ops `mbkernels::dwconv_bn_act_cuda` and `mbkernels::squeeze_excite_cuda` are defined in
csrc/registration.cpp. Their CPU kernels run the same CUDA kernel code on the host (an emulation, slow, for
testing the kernels' logic without a GPU): dispatch uses them only when the cuda backend is asked for by name.
"""
import functools

import torch

from .. import _native, ops



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


def unavailable_reason():
    return _native.unavailable_reason


def describe() -> str:
    C = _native.C
    built = f"mbkernels._C for torch {C.TORCH_VERSION}, CUDA {C.CUDA_VERSION}, archs {C.CUDA_ARCHS}"
    if not torch.cuda.is_available():
        built += " (no CUDA GPU here: asked for by name, it runs its kernels' host emulation on CPU tensors)"
    return built


@functools.lru_cache(maxsize=None)
def _device_reason(index: int):
    capability = torch.cuda.get_device_capability(index)
    archs = _native.C.CUDA_ARCHS
    if not runs_on(capability, archs):
        return f"cuda:{index} has compute capability {capability[0]}.{capability[1]}; mbkernels._C was built for {archs}"
    return None


def _why_not_device(explicit, x):
    if x.is_cuda:
        return _device_reason(x.device.index if x.device.index is not None else torch.cuda.current_device())
    if x.device.type == "cpu" and explicit:
        return None  # the host emulation of the CUDA kernels
    return f"x is on {x.device.type}; the cuda backend runs CUDA tensors"


# What csrc's launchers refuse (TORCH_CHECK), declined here so that dispatch picks another backend instead.
_INT32 = 2**31
_NCHW_TILE_SMEM_BYTES = 48 * 1024


def why_not_dwconv_bn_act(explicit, x, weight, bias, stride, padding, dilation, activation):
    return _why_not_device(explicit, x) or dwconv_limit_reason(x, weight, stride, padding, dilation)


def dwconv_limit_reason(x, weight, stride, padding, dilation):
    batch, channels, height, width = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    out_h, out_w = ops.dwconv_output_hw(x, weight, stride, padding, dilation)
    sizes = (height * width * channels, out_h * out_w * channels, channels * kh * kw, batch * channels,
             stride[0] * out_h, stride[1] * out_w, 4 * padding[0], 4 * padding[1])
    if max(sizes) >= _INT32:
        return f"one sample of x {tuple(x.shape)} is too large for the kernels' 32-bit offsets within a sample"
    if ops.memory_format_of(x) == torch.contiguous_format:
        halo_bytes = 4 * ((kh - 1) * dilation[0] + 1) * ((kw - 1) * dilation[1] + 1)  # one output pixel's tile
        if halo_bytes > _NCHW_TILE_SMEM_BYTES:
            return (f"kernel {kh}x{kw} with dilation {list(dilation)} needs {halo_bytes} bytes of shared memory per "
                    f"NCHW tile, over {_NCHW_TILE_SMEM_BYTES}; channels_last input runs")
    return None


def dwconv_bn_act(x, weight, bias, stride, padding, dilation, activation):
    return torch.ops.mbkernels.dwconv_bn_act_cuda(x, weight, bias, stride, padding, dilation, activation)


def why_not_squeeze_excite(explicit, x, w_reduce, *args):
    return _why_not_device(explicit, x) or squeeze_excite_limit_reason(x, w_reduce)


def squeeze_excite_limit_reason(x, w_reduce):
    batch, channels, height, width = x.shape
    if max(height * width * channels, channels * w_reduce.shape[0], batch * channels) >= _INT32:
        return f"one sample of x {tuple(x.shape)} is too large for the kernels' 32-bit offsets within a sample"
    return None


def squeeze_excite(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate):
    return torch.ops.mbkernels.squeeze_excite_cuda(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate)


if _native.C is not None:

    @torch.library.register_fake("mbkernels::dwconv_bn_act_cuda")
    def _(x, weight, bias, stride, padding, dilation, activation):
        ops.check_dwconv_bn_act_args(x, weight, bias, stride, padding, dilation, activation)
        return ops._empty_dwconv_output(x, weight, stride, padding, dilation)

    @torch.library.register_fake("mbkernels::squeeze_excite_cuda")
    def _(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate):
        ops.check_squeeze_excite_args(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate)
        return torch.empty_like(x, memory_format=ops.memory_format_of(x))
