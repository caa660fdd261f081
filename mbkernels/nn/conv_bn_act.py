"""ConvBNAct: any other Conv2d (dense, pointwise, grouped), its BatchNorm and its activation, folded into one conv.

The BatchNorm is folded into the conv's weight and bias once (the same fold-once buffers as DWConvBNAct), and the
conv itself runs as PyTorch's (oneDNN on CPUs, cuDNN on GPUs: no kernel of ours beats theirs for dense convs),
its activation applied in place on its fresh output. What disappears is a whole pass over memory per layer (the
BatchNorm's) and the activation's second tensor; traced, compiled and exported graphs hold a plain convolution,
which C++ packages run without libmbkernels.
"""
import torch
from torch import nn

from .. import ops
from ..conv_act import prepare_conv2d_act
from ..match.layers import check_conv_forward
from .dwconv import FoldedConvBNAct


def check_conv(conv: nn.Module) -> None:
    """Raise ValueError naming what keeps `conv` from having a BatchNorm folded into it."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    check_conv_forward(conv, "folded")


class ConvBNAct(FoldedConvBNAct):
    """act(bn(conv(x))) for an nn.Conv2d of any groups, as one conv on folded weights with the activation in place.

    Built and placed like DWConvBNAct (see FoldedConvBNAct); the folded weights follow the conv's dtype (a float16
    model convolves float16 weights), folded in float32."""

    check_conv = staticmethod(check_conv)

    def _fold(self) -> dict:
        weight, bias = self.folded_conv()
        dtype = self.conv.weight.dtype
        return {"folded_weight": weight.to(dtype), "folded_bias": bias.to(dtype)}

    def run_fused(self, x: torch.Tensor) -> torch.Tensor:
        folded = self.folded_conv_for(x)
        if folded is None:
            return self.stock_forward(x)
        if ops.plain_eager_call(x):  # the plan is made once per signature, not per call
            return self.plan_for(x, lambda: folded)(x)
        return folded(x)

    def folded_conv_for(self, x: torch.Tensor):
        """The folded conv (with its activation in place) as a function of inputs like x, or None where the stock
        modules must run."""
        weight, bias = self.folded_weights()  # first: a refold reads the conv's settings again
        padding = self.padding_for(x)
        if padding is None or x.dtype != weight.dtype:  # a dtype the stock conv refuses (or autocasts) too
            return None
        return prepare_conv2d_act(weight, bias, self.op_stride, padding, self.op_dilation, self.conv.groups,
                                  self.activation)

    def extra_repr(self) -> str:
        conv = self.conv
        text = (f"{conv.in_channels}, {conv.out_channels}, kernel_size={conv.kernel_size}, stride={conv.stride}"
                + (f", groups={conv.groups}" if conv.groups != 1 else ""))
        if self.op_padding is None:
            text += ", padding='SAME' (TensorFlow)"
        return text + f", activation={self.activation!r}, bn_folded={isinstance(self.bn, nn.BatchNorm2d)}"
