"""Fused drop-in modules. Each keeps the stock modules it replaces (same parameters, same state_dict entries)
and runs them as they are when training or when gradients are needed; in inference it calls one fused op
(ConvBNAct: one conv on folded weights)."""
from .fused import FusedModule
from .conv_bn_act import ConvBNAct
from .dwconv import DWConvBNAct
from .inverted_residual import InvertedResidual
from .mixed_conv import MixedDWConvBNAct
from .squeeze_excite import SqueezeExcite

__all__ = ["ConvBNAct", "DWConvBNAct", "FusedModule", "InvertedResidual", "MixedDWConvBNAct", "SqueezeExcite"]
