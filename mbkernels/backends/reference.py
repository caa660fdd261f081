"""The reference backend: plain PyTorch, any device. The oracle the other backends are held to."""
import torch
import torch.nn.functional as F

from .. import activations
from .._contract import BlockArgs, DWConvArgs, SEArgs, memory_format_of
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


def _conv1x1(h, weight, bias):
    return F.conv2d(h, weight.to(h.dtype)[:, :, None, None], bias.to(h.dtype))


def inverted_residual(args: BlockArgs):
    """In float32 (float64 for a float64 bundle: the fused module's structure check runs this formula)."""
    x = args.x
    compute = torch.promote_types(x.dtype, torch.float32)
    as_compute = lambda t: None if t is None else t.to(compute)  # noqa: E731
    h = x.to(compute)
    if args.w_expand is not None:
        h = activations.apply_activation(args.expand_activation, _conv1x1(h, args.w_expand, args.b_expand))
    top, bottom, left, right = args.padding
    d = F.conv2d(F.pad(h, [left, right, top, bottom]), as_compute(args.w_dw), as_compute(args.b_dw), args.stride, 0,
                 args.dilation, groups=h.shape[1])
    d = activations.apply_activation(args.dw_activation, d)
    if args.has_se:
        pooled = d.mean(dim=(2, 3))
        hidden = activations.apply_activation(
            args.se_activation, F.linear(pooled, as_compute(args.w_se_reduce), as_compute(args.b_se_reduce)))
        scale = activations.apply_gate(
            args.se_gate, F.linear(hidden, as_compute(args.w_se_expand), as_compute(args.b_se_expand)))
        d = activations.apply_activation(args.post_se_activation, d * scale[:, :, None, None])
    y = activations.apply_activation(args.project_activation, _conv1x1(d, args.w_project, args.b_project))
    if args.residual:
        y = y + x.to(compute)
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


BACKEND = Backend(
    name="reference",
    priority=30,
    devices=(ANY_DEVICE,),
    unavailable_reason=lambda: None,
    describe=lambda: "plain PyTorch on any device",
    ops={"dwconv_bn_act": OpSupport(dwconv_bn_act), "squeeze_excite": OpSupport(squeeze_excite),
         "inverted_residual": OpSupport(inverted_residual)},
)
