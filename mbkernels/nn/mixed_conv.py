"""MixedDWConvBNAct: MixNet's MixedConv2d (channel groups, each with its own depthwise kernel size), its BatchNorm
and its activation, run as ONE depthwise op call in inference.

The groups' kernels are zero-padded, centred, to the largest kernel and stacked into one depthwise weight
[C, 1, kmax_h, kmax_w]. A group whose kernel is centred `offset` taps inside the large one reads its window from
`offset * dilation` pixels further out, so its padding grows by that much; for odd kernels with PyTorch's symmetric
padding or TensorFlow's 'SAME' every group's grown padding is the same, and one conv over the whole input computes
every group exactly (the zero taps add exact zeros). No new kernel is needed.
"""
from typing import Optional

import torch
from torch import nn

from ..match.layers import check_depthwise
from ..match.padding import static_padding, tf_same_padding
from .dwconv import DWConvBNAct


def mixed_groups(mixed: nn.Module) -> list[nn.Conv2d]:
    """The depthwise convs of a MixedConv2d-like module (its children, in channel order); ValueError saying what
    does not fit: not all depthwise, other strides or dilations, or kernels whose centres do not line up."""
    convs = list(mixed.children())
    if len(convs) < 2 or not all(isinstance(conv, nn.Conv2d) for conv in convs):
        raise ValueError(f"{type(mixed).__name__} is not a mixed depthwise conv: its children must be two or more "
                         f"Conv2d, got {', '.join(type(c).__name__ for c in convs) or 'none'}")
    for i, conv in enumerate(convs):
        try:
            check_depthwise(conv)
        except ValueError as error:
            raise ValueError(f"group {i} of {type(mixed).__name__}: {error}") from None
    settings = {(tuple(c.stride), tuple(c.dilation), c.out_channels // c.in_channels, static_padding(c) is None)
                for c in convs}
    if len(settings) != 1:
        raise ValueError(f"the groups of {type(mixed).__name__} differ in stride, dilation, depth multiplier or "
                         "padding kind; only groups that differ in kernel size alone are fused")
    largest = [max(c.kernel_size[d] for c in convs) for d in (0, 1)]
    if any((k - c.kernel_size[d]) % 2 for c in convs for d, k in enumerate(largest)):
        kernels = ", ".join(str(tuple(c.kernel_size)) for c in convs)
        raise ValueError(f"the kernels of {type(mixed).__name__} ({kernels}) cannot all be centred in the largest one "
                         "(their sizes differ by an odd number)")
    channels = getattr(mixed, "in_channels", None)
    if channels is not None and channels != sum(c.in_channels for c in convs):
        raise ValueError(f"{type(mixed).__name__} has in_channels={channels} but its groups sum to "
                         f"{sum(c.in_channels for c in convs)}")
    return convs


def _offsets(conv: nn.Conv2d, largest: list[int]) -> list[int]:
    """How much further out conv's taps start once its kernel sits centred in the largest one: [h, w] pixels."""
    return [(k - conv.kernel_size[d]) // 2 * conv.dilation[d] for d, k in enumerate(largest)]


def group_paddings(convs: list[nn.Conv2d]) -> list[tuple]:
    """What the stacked padding depends on besides the input's size, found once per module (identifying a
    subclass's padding runs probes): per group, (conv, its static padding or None for TensorFlow 'SAME', the
    [top, bottom, left, right] its padding grows by once its kernel is centred in the largest)."""
    largest = [max(c.kernel_size[d] for c in convs) for d in (0, 1)]
    groups = []
    for conv in convs:
        dh, dw = _offsets(conv, largest)
        groups.append((conv, static_padding(conv), (dh, dh, dw, dw)))
    return groups


def stacked_padding(groups: list[tuple], size: Optional[tuple]) -> Optional[list[int]]:
    """[top, bottom, left, right] under which the stacked kernel computes every group (group_paddings) exactly,
    for an input plane of `size` (needed for TensorFlow 'SAME' only); None when the groups' paddings do not line
    up."""
    grown = {tuple(p + g for p, g in zip(tf_same_padding(size, conv) if padding is None else padding, growth))
             for conv, padding, growth in groups}
    return list(grown.pop()) if len(grown) == 1 else None


class MixedDWConvBNAct(DWConvBNAct):
    """act(bn(mixed(x))) for a MixedConv2d of depthwise groups, computed by one `mbkernels.ops.dwconv_bn_act` call.

    Built and placed by `mbkernels.patch` like DWConvBNAct (conv: the MixedConv2d; its state_dict entries keep their
    stock names); in training mode, when autograd needs a graph, or for an input whose groups' paddings would not
    line up, the stock modules run unchanged.
    """

    @staticmethod
    def check_conv(mixed: nn.Module) -> None:
        groups = group_paddings(mixed_groups(mixed))
        if groups[0][1] is not None and stacked_padding(groups, None) is None:
            paddings = ", ".join(str(padding) for _, padding, _ in groups)
            raise ValueError(f"the groups' paddings ({paddings}) do not line up once their kernels are centred in "
                             "the largest; such a mixed conv cannot run as one depthwise conv")

    @staticmethod
    def static_padding(mixed: nn.Module) -> Optional[list[int]]:
        groups = group_paddings(mixed_groups(mixed))
        return None if groups[0][1] is None else stacked_padding(groups, None)

    @staticmethod
    def stride_dilation(mixed: nn.Module) -> tuple:
        first = next(mixed.children())
        return tuple(first.stride), tuple(first.dilation)

    def read_conv_settings(self) -> None:
        super().read_conv_settings()
        # Read with the conv's other settings, not per call: a traced forward then holds only the size arithmetic.
        self.group_paddings = group_paddings(list(self.conv.children()))

    def padding_for(self, x: torch.Tensor) -> Optional[list[int]]:
        return self.op_padding if self.op_padding is not None else stacked_padding(self.group_paddings, x.shape[2:])

    @torch.no_grad()
    def conv_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        convs = list(self.conv.children())
        largest = [max(c.kernel_size[d] for c in convs) for d in (0, 1)]
        first = convs[0].weight
        out_channels = sum(c.out_channels for c in convs)
        weight = torch.zeros(out_channels, 1, *largest, dtype=torch.float32, device=first.device)
        bias = torch.zeros(out_channels, dtype=torch.float32, device=first.device)
        start = 0
        for conv in convs:
            (top, left), (kh, kw) = [o // d for o, d in zip(_offsets(conv, largest), conv.dilation)], conv.kernel_size
            end = start + conv.out_channels
            weight[start:end, :, top:top + kh, left:left + kw] = conv.weight.to(torch.float32)
            if conv.bias is not None:
                bias[start:end] = conv.bias.to(torch.float32)
            start = end
        return weight, bias

    def _fold_modules(self) -> tuple:
        return (*self.conv.children(), self.bn)

    def extra_repr(self) -> str:
        convs = list(self.conv.children())
        kernels = ", ".join(f"{c.in_channels}x{tuple(c.kernel_size)}" for c in convs)
        return f"groups=[{kernels}], stride={self.op_stride}, activation={self.activation!r}, fused=True"
