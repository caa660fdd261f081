"""The reference backend: plain PyTorch, any device. The oracle the other backends are held to."""
import torch
import torch.nn.functional as F

from .. import activations
from ..conv_act import conv2d_act, prepare_conv2d_act
from .._contract import BlockArgs, DWConvArgs, SEArgs, memory_format_of
from . import ANY_DEVICE, Backend, OpSupport


def dwconv_bn_act(args: DWConvArgs):
    x = args.x
    y = conv2d_act(x.float(), args.weight.contiguous(), args.bias, args.stride, args.padding, args.dilation, x.shape[1],
                   args.activation)
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def prepare_dwconv_bn_act(args: DWConvArgs):
    """A float32 plan: the conv and its activation, nothing else per call (the output keeps x's layout, as
    F.conv2d's does); None for what the generic plan serves (other dtypes)."""
    if args.x.dtype != torch.float32:
        return None
    return prepare_conv2d_act(args.weight.contiguous(), args.bias, args.stride, args.padding, args.dilation,
                              args.x.shape[1], args.activation)


def prepare_squeeze_excite(args: SEArgs):
    """A float32 plan: pool, MLP, scale, nothing else per call (x * scale keeps x's layout)."""
    if args.x.dtype != torch.float32:
        return None
    w_reduce, b_reduce, w_expand, b_expand = args.w_reduce, args.b_reduce, args.w_expand, args.b_expand
    activate, gate = activations.in_place(args.activation), activations.gate_function(args.gate)
    return lambda x: x * gate(F.linear(activate(F.linear(x.mean((2, 3)), w_reduce, b_reduce)), w_expand,
                                       b_expand))[:, :, None, None]


def squeeze_excite(args: SEArgs):
    x = args.x
    pooled = x.float().mean(dim=(2, 3))
    hidden = activations.apply_activation(args.activation, F.linear(pooled, args.w_reduce, args.b_reduce))
    scale = activations.apply_gate(args.gate, F.linear(hidden, args.w_expand, args.b_expand))
    y = x.float() * scale[:, :, None, None]
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def _conv1x1_act(h, weight, bias, activation: str):
    return conv2d_act(h, weight.to(h.dtype).contiguous()[:, :, None, None], bias.to(h.dtype), 1, [0] * 4, 1, 1,
                      activation)


def inverted_residual(args: BlockArgs):
    """In float32 (float64 for a float64 bundle: the fused module's structure check runs this formula)."""
    x = args.x
    compute = torch.promote_types(x.dtype, torch.float32)
    as_compute = lambda t: None if t is None else t.to(compute)  # noqa: E731
    h = x.to(compute)
    if args.w_expand is not None:
        h = _conv1x1_act(h, args.w_expand, args.b_expand, args.expand_activation)
    d = conv2d_act(h, as_compute(args.w_dw).contiguous(), as_compute(args.b_dw), args.stride, args.padding, args.dilation,
                   h.shape[1], args.dw_activation)
    if args.has_se:
        pooled = d.mean(dim=(2, 3))
        hidden = activations.apply_activation(
            args.se_activation, F.linear(pooled, as_compute(args.w_se_reduce), as_compute(args.b_se_reduce)))
        scale = activations.apply_gate(
            args.se_gate, F.linear(hidden, as_compute(args.w_se_expand), as_compute(args.b_se_expand)))
        d = activations.apply_activation(args.post_se_activation, d * scale[:, :, None, None], in_place=True)
    y = _conv1x1_act(d, args.w_project, args.b_project, args.project_activation)
    if args.residual:
        y = y.add_(x.to(compute))
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


BACKEND = Backend(
    name="reference",
    priority=30,
    devices=(ANY_DEVICE,),
    unavailable_reason=lambda: None,
    describe=lambda: "plain PyTorch on any device",
    # In AOTInductor packages the op stays whole: libmbkernels' CPU kernels run it there (csrc/public_ops.cpp).
    traced_in_place=lambda aot: not aot,
    ops={"dwconv_bn_act": OpSupport(dwconv_bn_act, prepare=prepare_dwconv_bn_act),
         "squeeze_excite": OpSupport(squeeze_excite, prepare=prepare_squeeze_excite),
         "inverted_residual": OpSupport(inverted_residual)},
)
