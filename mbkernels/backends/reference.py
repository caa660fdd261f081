"""The reference backend: plain PyTorch, any device. The oracle the other backends are held to."""
import torch.nn.functional as F

from .. import activations
from .._contract import DWConvArgs, SEArgs, memory_format_of
from . import ANY_DEVICE, Backend, OpSupport


def dwconv_bn_act(args: DWConvArgs):
    x = args.x
    top, bottom, left, right = args.padding
    if (top, left) == (bottom, right):
        y = F.conv2d(x.float(), args.weight, args.bias, args.stride, [top, left], args.dilation, groups=x.shape[1])
    else:
        y = F.conv2d(F.pad(x.float(), [left, right, top, bottom]), args.weight, args.bias, args.stride, 0,
                     args.dilation, groups=x.shape[1])
    y = activations.apply_activation(args.activation, y)
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def squeeze_excite(args: SEArgs):
    x = args.x
    pooled = x.float().mean(dim=(2, 3))
    hidden = activations.apply_activation(args.activation, F.linear(pooled, args.w_reduce, args.b_reduce))
    scale = activations.apply_gate(args.gate, F.linear(hidden, args.w_expand, args.b_expand))
    y = x.float() * scale[:, :, None, None]
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


BACKEND = Backend(
    name="reference",
    priority=30,
    devices=(ANY_DEVICE,),
    unavailable_reason=lambda: None,
    describe=lambda: "plain PyTorch on any device",
    ops={"dwconv_bn_act": OpSupport(dwconv_bn_act), "squeeze_excite": OpSupport(squeeze_excite)},
)
