"""The public ops: argument checks, schemas, fake kernels and the functions users call.

Each public op is one registered custom op (`torch.ops.mbkernels.<name>`) whose fake kernel lets
torch.compile(fullgraph=True) trace it; its real kernel normalises the arguments once and hands them to the
backend that `dispatch.select` picks. Plain eager calls of the public functions run that same implementation
without the custom-op dispatch (see _plain_eager_call). Backends then receive:
  x       contiguous in its own layout (NCHW or channels_last), float32/float16/bfloat16, N > 0;
  weights contiguous float32 on x's device.
"""
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import activations, dispatch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IntOrPair = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------------------------- helpers
def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last when x is laid out (or viewed) with channels innermost, else NCHW."""
    if x.dim() == 4 and not x.is_contiguous() and x.stride(1) == 1 and x.shape[1] > 1:
        return torch.channels_last
    return torch.contiguous_format


def _pair(value: IntOrPair, name: str) -> list[int]:
    if isinstance(value, int):
        return [value, value]
    try:
        pair = list(value)
    except TypeError:
        pair = None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _check_tensor(t, name: str, dims: int, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be a {dims}-D tensor, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; put them on one device")


def _check_x(x) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")


def _plain_eager_call(*tensors: Optional[Tensor]) -> bool:
    """True for a call on plain tensors outside any tracing, compiling or autograd recording: the public functions
    then run the op's implementation directly, skipping the custom-op dispatch (tens of microseconds a call, which
    matters at batch 1). Every other call goes through the registered op, so it is traced as one node (and refuses
    backward, which the op does not implement)."""
    present = [t for t in tensors if t is not None]
    if not all(type(t) in (Tensor, torch.nn.Parameter) for t in present):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


def _as_float32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


# ----------------------------------------------------------------------------- depthwise conv + BN + act
def dwconv_output_hw(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    kh, kw = weight.shape[2], weight.shape[3]
    out_h = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return out_h, out_w


def check_dwconv_bn_act_args(x, weight, bias, stride, padding, dilation, activation) -> None:
    _check_x(x)
    channels = x.shape[1]
    _check_tensor(weight, "weight", 4, x.device)
    if weight.shape[0] != channels or weight.shape[1] != 1:
        raise ValueError(
            f"weight must be [C, 1, kh, kw] with C = {channels} (x's channels) for a depthwise conv, got "
            f"{tuple(weight.shape)}; a conv that is not depthwise (groups != channels) cannot be fused"
        )
    _check_tensor(bias, "bias", 1, x.device)
    if bias.shape[0] != channels:
        raise ValueError(f"bias must be [C] = [{channels}], got {tuple(bias.shape)}")
    for name, pair, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(pair) != 2 or min(pair) < low:
            raise ValueError(f"{name} must be two ints >= {low}, got {list(pair)}")
    activations.activation_code(activation)
    out_h, out_w = dwconv_output_hw(x, weight, stride, padding, dilation)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"the output would be empty ({out_h}x{out_w}): kernel {tuple(weight.shape[2:])} with dilation "
            f"{list(dilation)} does not fit x's {x.shape[2]}x{x.shape[3]} plane padded by {list(padding)}"
        )


def _empty_dwconv_output(x, weight, stride, padding, dilation) -> Tensor:
    out_h, out_w = dwconv_output_hw(x, weight, stride, padding, dilation)
    return torch.empty(
        (x.shape[0], x.shape[1], out_h, out_w), dtype=x.dtype, device=x.device, memory_format=memory_format_of(x)
    )


def _run_dwconv_bn_act(x, weight, bias, stride, padding, dilation, activation, backend) -> Tensor:
    check_dwconv_bn_act_args(x, weight, bias, stride, padding, dilation, activation)
    if x.numel() == 0:
        return _empty_dwconv_output(x, weight, stride, padding, dilation)
    x = x.contiguous(memory_format=memory_format_of(x))
    weight, bias = _as_float32(weight), _as_float32(bias)
    run = dispatch.select("dwconv_bn_act", backend, x, weight, bias, stride, padding, dilation, activation)
    return run(x, weight, bias, stride, padding, dilation, activation)


@torch.library.custom_op("mbkernels::dwconv_bn_act", mutates_args=())
def _dwconv_bn_act_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    activation: str,
    backend: str,
) -> Tensor:
    return _run_dwconv_bn_act(x, weight, bias, stride, padding, dilation, activation, backend)


@_dwconv_bn_act_op.register_fake
def _(x, weight, bias, stride, padding, dilation, activation, backend):
    check_dwconv_bn_act_args(x, weight, bias, stride, padding, dilation, activation)
    return _empty_dwconv_output(x, weight, stride, padding, dilation)


def dwconv_bn_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    stride: IntOrPair = 1,
    padding: Optional[IntOrPair] = None,
    dilation: IntOrPair = 1,
    activation: str = "hardswish",
    backend: Optional[str] = None,
) -> Tensor:
    """act(conv2d(x, weight, bias, stride, padding, dilation, groups=C)) in one pass over memory.

    weight [C, 1, kh, kw] and bias [C] carry the folded BatchNorm (see `fold_bn`). padding=None pads by
    dilation * (k // 2), which keeps the plane's size at stride 1. The output has x's dtype and memory format.
    """
    _check_x(x)
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if padding is None:
        if not isinstance(weight, Tensor) or weight.dim() != 4:
            check_dwconv_bn_act_args(x, weight, bias, stride, [0, 0], dilation, activation)
        padding = [dilation[0] * (weight.shape[2] // 2), dilation[1] * (weight.shape[3] // 2)]
    padding = _pair(padding, "padding")
    args = (x, weight, bias, stride, padding, dilation, activation, backend or "")
    if _plain_eager_call(x, weight, bias):
        return _run_dwconv_bn_act(*args)
    return torch.ops.mbkernels.dwconv_bn_act(*args)


@torch.no_grad()
def fold_bn(conv: torch.nn.Conv2d, bn: Optional[torch.nn.BatchNorm2d]) -> tuple[Tensor, Tensor]:
    """The float32 (weight, bias) of conv followed by eval-mode bn, as one conv.

    bn may be None (the conv's own weight and bias, or zeros). BatchNorm without running statistics
    normalises with batch statistics and cannot be folded.
    """
    weight = conv.weight.to(torch.float32)
    if conv.bias is not None:
        bias = conv.bias.to(torch.float32)
    else:
        bias = torch.zeros(conv.out_channels, dtype=torch.float32, device=weight.device)
    if bn is None:
        return weight.contiguous(), bias.contiguous()
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn has no running statistics (track_running_stats=False) and cannot be folded")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn has {bn.num_features} features but conv has {conv.out_channels} output channels")
    scale = torch.rsqrt(bn.running_var.to(torch.float32) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(torch.float32)
    shift = -bn.running_mean.to(torch.float32) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(torch.float32)
    folded_weight = weight * scale.reshape(-1, 1, 1, 1)
    folded_bias = bias * scale + shift
    return folded_weight.contiguous(), folded_bias.contiguous()


# -------------------------------------------------------------------------------------- squeeze-excite
def _as_matrix(w, name: str, rows: int, cols: int, device) -> None:
    if not isinstance(w, Tensor):
        raise ValueError(f"{name} must be a Tensor, got {type(w).__name__}")
    if w.dim() == 4 and w.shape[2:] == (1, 1):
        w = w.flatten(1)
    _check_tensor(w, name, 2, device)
    if tuple(w.shape) != (rows, cols):
        raise ValueError(f"{name} must be [{rows}, {cols}] (or [{rows}, {cols}, 1, 1]), got {tuple(w.shape)}")


def check_squeeze_excite_args(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate) -> None:
    _check_x(x)
    channels = x.shape[1]
    if not isinstance(w_reduce, Tensor) or w_reduce.dim() not in (2, 4):
        got = tuple(w_reduce.shape) if isinstance(w_reduce, Tensor) else type(w_reduce).__name__
        raise ValueError(f"w_reduce must be [R, C] (or [R, C, 1, 1]), got {got}")
    reduced = w_reduce.shape[0]
    _as_matrix(w_reduce, "w_reduce", reduced, channels, x.device)
    _as_matrix(w_expand, "w_expand", channels, reduced, x.device)
    for name, b, size in (("b_reduce", b_reduce, reduced), ("b_expand", b_expand, channels)):
        if b is not None:
            _check_tensor(b, name, 1, x.device)
            if b.shape[0] != size:
                raise ValueError(f"{name} must be [{size}], got {tuple(b.shape)}")
    if activation not in activations.SE_ACTIVATIONS:
        raise ValueError(
            f"unknown squeeze-excite activation {activation!r}; expected one of {', '.join(activations.SE_ACTIVATIONS)}"
        )
    activations.gate_code(gate)


def _run_squeeze_excite(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate, backend) -> Tensor:
    check_squeeze_excite_args(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=memory_format_of(x))
    x = x.contiguous(memory_format=memory_format_of(x))
    w_reduce, w_expand = _as_float32(w_reduce.flatten(1)), _as_float32(w_expand.flatten(1))
    b_reduce, b_expand = _as_float32(b_reduce), _as_float32(b_expand)
    args = (x, w_reduce, b_reduce, w_expand, b_expand, activation, gate)
    return dispatch.select("squeeze_excite", backend, *args)(*args)


@torch.library.custom_op("mbkernels::squeeze_excite", mutates_args=())
def _squeeze_excite_op(
    x: Tensor,
    w_reduce: Tensor,
    b_reduce: Optional[Tensor],
    w_expand: Tensor,
    b_expand: Optional[Tensor],
    activation: str,
    gate: str,
    backend: str,
) -> Tensor:
    return _run_squeeze_excite(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate, backend)


@_squeeze_excite_op.register_fake
def _(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate, backend):
    check_squeeze_excite_args(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate)
    return torch.empty_like(x, memory_format=memory_format_of(x))


def squeeze_excite(
    x: Tensor,
    w_reduce: Tensor,
    b_reduce: Optional[Tensor],
    w_expand: Tensor,
    b_expand: Optional[Tensor],
    activation: str = "relu",
    gate: str = "hardsigmoid",
    backend: Optional[str] = None,
) -> Tensor:
    """x * gate(w_expand @ act(w_reduce @ mean_hw(x) + b_reduce) + b_expand), the gate broadcast over H, W.

    w_reduce is [R, C] and w_expand [C, R] (1x1-conv weights [R, C, 1, 1] / [C, R, 1, 1] also do); biases
    may be None. The pooled mean and the MLP run in float32; the output has x's dtype and memory format.
    """
    _check_x(x)
    args = (x, w_reduce, b_reduce, w_expand, b_expand, activation, gate, backend or "")
    if _plain_eager_call(x, w_reduce, b_reduce, w_expand, b_expand):
        return _run_squeeze_excite(*args)
    return torch.ops.mbkernels.squeeze_excite(*args)
