"""The reference backend: plain PyTorch, any device. The oracle the other backends are held to."""
import torch
import torch.nn.functional as F

from .. import activations
from ..ops import memory_format_of


def unavailable_reason():
    return None


def describe() -> str:
    return "plain PyTorch on any device"


def why_not_dwconv_bn_act(explicit, *args):
    return None


def dwconv_bn_act(x, weight, bias, stride, padding, dilation, activation):
    y = F.conv2d(x.float(), weight, bias, stride, padding, dilation, groups=x.shape[1])
    y = activations.apply_activation(activation, y)
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def why_not_squeeze_excite(explicit, *args):
    return None


def squeeze_excite(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate):
    pooled = x.float().mean(dim=(2, 3))
    hidden = activations.apply_activation(activation, F.linear(pooled, w_reduce, b_reduce))
    scale = activations.apply_gate(gate, F.linear(hidden, w_expand, b_expand))
    y = x.float() * scale[:, :, None, None]
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))
