"""DWConvBNAct: a depthwise Conv2d, its BatchNorm and its activation, run as one fused op in inference."""
from typing import Optional

import torch
from torch import nn

from .. import activations, ops
from ._cache import DerivedTensors


def activation_name(act: Optional[nn.Module]) -> str:
    """The fused-op name of a stock activation module (None or nn.Identity: 'identity')."""
    if act is None:
        return "identity"
    name = activations.ACTIVATION_MODULES.get(type(act))
    if name is None:
        supported = ", ".join(cls.__name__ for cls in activations.ACTIVATION_MODULES)
        raise ValueError(f"activation {type(act).__name__} has no fused kernel; supported: {supported}")
    return name


def check_depthwise(conv: nn.Module) -> None:
    """Raise ValueError naming what keeps `conv` from being a fusable depthwise conv."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    if not (conv.groups == conv.in_channels == conv.out_channels):
        raise ValueError(
            f"conv is not depthwise: groups={conv.groups}, in_channels={conv.in_channels}, "
            f"out_channels={conv.out_channels} (all three must be equal)"
        )
    if isinstance(conv.padding, str):
        raise ValueError(f"conv has padding={conv.padding!r}; only explicit padding is fused")
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv has padding_mode={conv.padding_mode!r}; only zero padding is fused")


class DWConvBNAct(nn.Module):
    """act(bn(conv(x))) for a depthwise conv, computed by `mbkernels.ops.dwconv_bn_act` in inference.

    conv: a depthwise nn.Conv2d; bn: an nn.BatchNorm2d (or None); act: a stock activation module (or None).
    In training mode, or when autograd needs a graph, the stock modules run unchanged. The folded weights are
    cached and refolded whenever a parameter or statistic changes (load_state_dict, in-place edits, .to()).
    """

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None, act: Optional[nn.Module] = None,
                 backend: Optional[str] = None):
        super().__init__()
        check_depthwise(conv)
        self.activation = activation_name(act)
        self.conv = conv
        self.bn = bn if bn is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()
        self.backend = backend
        self._folded = DerivedTensors()

    def _fold_sources(self):
        tensors = [self.conv.weight, self.conv.bias]
        if isinstance(self.bn, nn.BatchNorm2d):
            tensors += [self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var]
        return [t for t in tensors if t is not None]

    def folded_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 (weight, bias) with BN folded in, refolded when any source tensor changed."""
        bn = self.bn if isinstance(self.bn, nn.BatchNorm2d) else None
        return self._folded.get(self._fold_sources(), lambda: ops.fold_bn(self.conv, bn))

    def _apply(self, fn, recurse=True):
        self._folded.clear()
        return super()._apply(fn, recurse)

    def uses_fused_kernel(self, x: torch.Tensor) -> bool:
        if self.training:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_fused_kernel(x):
            return self.act(self.bn(self.conv(x)))
        weight, bias = self.folded_weights()
        conv = self.conv
        return ops.dwconv_bn_act(
            x, weight, bias, conv.stride, conv.padding, conv.dilation, self.activation, self.backend
        )

    def extra_repr(self) -> str:
        conv = self.conv
        return (f"channels={conv.in_channels}, kernel_size={conv.kernel_size}, stride={conv.stride}, "
                f"activation={self.activation!r}, fused=True")
