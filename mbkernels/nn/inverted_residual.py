"""InvertedResidual: a whole inverted-residual block (expand 1x1 -> BN -> act -> depthwise -> BN -> act -> [SE] ->
project 1x1 -> BN -> [+ x]) run as one fused op in inference.

Recognised by structure, never by class name: the block's modules in registration order (containers such as
nn.Sequential and torchvision's Conv2dNormActivation opened, identities such as DropPath / StochasticDepth /
Dropout in eval skipped) must read [1x1 conv, BN, act], depthwise conv, BN, [act], [SE, [act]], 1x1 conv, BN,
[act]. That covers timm's InvertedResidual and DepthwiseSeparableConv, torchvision's InvertedResidual (MobileNetV2
and V3) and MBConv, and hand-written blocks. Since a forward can compute anything (and only it says whether the
input is added back), a match is proven on a probe with random BatchNorm statistics (mbkernels.match).

The module holds the stock block (its state_dict keys and values are the block's) and folds every BN into its conv
once, into float32 buffers laid out for the kernels; it refolds after load_state_dict, .to() / .half(), and when
switched to eval mode (training may have changed the statistics). Edits of the stock block's tensors in eval mode
need `refresh()`.
"""
import copy
from typing import Optional

import torch
from torch import nn

from ..backends import proof_backend
from .. import activations, ops
from .._contract import (BlockArgs, check_inverted_residual, device_layout, input_major, normalise_inverted_residual,
                         tap_major)
from ..match import probe_copy, probe_input, prove
from ..match.block import BlockParts, find_block_parts
from ..match.padding import static_padding
from .fused import FusedModule, use_stock_state_dict_keys
from .dwconv import FusedInto
from .squeeze_excite import se_expand_weights, se_reduce_weights

_FOLDED = ("w_expand", "b_expand", "w_dw", "b_dw", "w_se_reduce", "b_se_reduce", "w_se_expand", "b_se_expand",
           "w_project", "b_project")


# ------------------------------------------------------------------------------------------------ folding
@torch.no_grad()
def fold(modules: dict, parts: BlockParts) -> dict:
    """The op's float32 weights of the block (BN folded), by argument name; absent parts give None. modules maps
    the paths of parts to the stock modules."""
    get = lambda path: modules[path] if path is not None else None  # noqa: E731
    folded = dict.fromkeys(_FOLDED)
    if parts.expand_conv is not None:
        weight, folded["b_expand"] = ops.fold_bn(get(parts.expand_conv), get(parts.expand_bn))
        folded["w_expand"] = device_layout(weight.flatten(1), input_major)
    weight, folded["b_dw"] = ops.fold_bn(get(parts.dw_conv), get(parts.dw_bn))
    folded["w_dw"] = device_layout(weight, tap_major)
    if parts.se is not None:
        reduce = get(parts.se_reduce)
        folded["w_se_reduce"], folded["b_se_reduce"] = se_reduce_weights(reduce, get(parts.se_norm), torch.float32)
        folded["w_se_expand"], folded["b_se_expand"] = se_expand_weights(
            get(parts.se_expand), reduce.weight.shape[1], torch.float32, reduce.weight.device, parts.se_gate)
    weight, folded["b_project"] = ops.fold_bn(get(parts.project_conv), get(parts.project_bn))
    folded["w_project"] = device_layout(weight.flatten(1), input_major)
    return folded


# ------------------------------------------------------------------------------------------------ module
class InvertedResidual(FusedModule):
    """A stock inverted-residual block computed by `mbkernels.ops.inverted_residual` in inference.

    Build it with `InvertedResidual.from_module(block)`. The stock block stays inside as `stock` and runs
    unchanged in training mode or when autograd needs a graph; the state_dict has the block's own keys."""

    stands_in_for = "stock"  # code reading the stock block's attributes reads them (StandIn)

    def __init__(self, stock: nn.Module, parts: BlockParts, backend: Optional[str] = None,
                 pad_before: Optional[list] = None):
        super().__init__()
        self.stock = stock
        self.parts = parts
        self.se_op_gate = activations.parse_gate(parts.se_gate)[0]  # the op's: an affine map before it is folded in
        self.backend = backend
        self.pad_before = pad_before  # [top, bottom, left, right] a forward pads by before the dw conv (nn.rewrite)
        self.part_paths = tuple(path for path in (
            parts.expand_conv, parts.expand_bn, parts.dw_conv, parts.dw_bn, parts.se_reduce, parts.se_expand,
            parts.se_norm, parts.project_conv, parts.project_bn) if path)
        # The stock modules as found at build: what a path leads to when layer fusion inside the block (timed
        # beside block fusion by a tuned patch) has put a fused module in its place.
        object.__setattr__(self, "_built_parts", {path: stock.get_submodule(path) for path in self.part_paths})
        self.read_dw_settings()
        for name in _FOLDED:
            self.register_buffer(name, None, persistent=False)
        self.refresh()
        self.training = stock.training  # swapped into a model in eval mode, it runs fused at once
        use_stock_state_dict_keys(self)

    @classmethod
    def from_module(cls, block: nn.Module, backend: Optional[str] = None) -> "InvertedResidual":
        """Wrap a stock or hand-written block; ValueError saying what did not match for anything else."""
        if not isinstance(block, nn.Module):
            raise ValueError(f"expected an nn.Module, got {type(block).__name__}")
        if isinstance(block, InvertedResidual):
            raise ValueError("the module is already a fused InvertedResidual")
        parts = find_block_parts(block)
        return cls(block, parts._replace(residual=cls.prove_residual(block, parts)), backend)

    @classmethod
    def prove_residual(cls, block: nn.Module, parts: BlockParts) -> bool:
        """Whether the block adds its input back (only its forward says), proven on a probe; ValueError when the
        block computes neither the fused formula nor the formula plus its input."""
        generator = torch.Generator().manual_seed(0)
        stock = probe_copy(block, generator)
        dw_conv = stock.get_submodule(parts.dw_conv)
        channels = (stock.get_submodule(parts.expand_conv) if parts.expand_conv else dw_conv).in_channels
        size = 5 + max(d * (k - 1) for d, k in zip(dw_conv.dilation, dw_conv.kernel_size))
        probe = probe_input(channels, size, size + 2, generator, batch=2)
        variants = [(residual, lambda residual=residual: cls(copy.deepcopy(stock), parts._replace(residual=residual),
                                                            backend=proof_backend()))
                    for residual in (False, True)]
        try:
            proof = prove(stock, variants, probe)
        except Exception as error:  # whatever a hand-written forward raises: not a block we can stand in for
            raise ValueError(f"{type(block).__name__} failed on a probe input of shape {tuple(probe.shape)}: "
                             f"{error}") from error
        if proof.failure is not None:
            raise ValueError(f"{type(block).__name__} has the layers of an inverted-residual block but does not "
                             f"compute one: {proof.failure}")
        return proof.proven

    @property
    def part_modules(self) -> dict:
        """Path -> the stock module of each part, as the block holds it now (one replaced by another is seen)."""
        found = {}
        for path in self.part_paths:
            try:
                module = self.stock.get_submodule(path)
            except AttributeError:
                module = None
            stock = getattr(module, "stock", None) if isinstance(module, FusedInto) else getattr(module, "conv", None)
            found[path] = (module if isinstance(module, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm))
                           else stock if isinstance(stock, nn.Module) else self._built_parts[path])
        return found

    def read_dw_settings(self) -> None:
        """stride, dilation and padding from the depthwise conv as it is now (and what the forward pads before)."""
        dw_conv = self.part_modules[self.parts.dw_conv]
        self.op_stride, self.op_dilation = list(dw_conv.stride), list(dw_conv.dilation)
        padding = static_padding(dw_conv)
        self.op_padding = padding if self.pad_before is None else [a + b for a, b in zip(padding, self.pad_before)]

    def _fold_modules(self):
        return tuple(self.part_modules.values())

    def _fold_settings(self) -> tuple:
        parts = self.part_modules
        dw_conv = parts[self.parts.dw_conv]
        return ((dw_conv.stride, dw_conv.padding, dw_conv.dilation),
                *(m.eps for m in parts.values() if isinstance(m, nn.modules.batchnorm._BatchNorm)))

    def _fold(self) -> dict:
        """The stock block's BNs folded into the float32 buffers the op reads (the dw conv's settings read again)."""
        self.read_dw_settings()
        return fold(self.part_modules, self.parts)

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            self.refresh()  # training updated the BN statistics
        return self

    def stock_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stock(x)

    def op_call(self, x: torch.Tensor) -> tuple:
        """(op name, its arguments for x, the backend aside)."""
        self.refresh_if_stale()
        return ("inverted_residual", *self.op_args(x))

    def op_args(self, x: torch.Tensor) -> BlockArgs:
        """The op's arguments for input x: this module's folded weights and settings."""
        parts = self.parts
        return BlockArgs(
            x=x, **{name: getattr(self, name) for name in _FOLDED}, expand_activation=parts.expand_activation,
            stride=self.op_stride, padding=self.op_padding, dilation=self.op_dilation, dw_activation=parts.dw_activation,
            se_activation=parts.se_activation, se_gate=self.se_op_gate, post_se_activation=parts.post_se_activation,
            project_activation=parts.project_activation, residual=parts.residual)

    @property
    def shape(self) -> str:
        """C, E, O, the depthwise kernel and stride, SE and residual: "C=16 E=64 O=24 k3x3 s2 se +x"."""
        dw = self.part_modules[self.parts.dw_conv]
        first = self.part_modules[self.parts.expand_conv] if self.parts.expand_conv else dw
        text = (f"C={first.in_channels} E={dw.in_channels} O={self.w_project.shape[0]} "
                f"k{dw.kernel_size[0]}x{dw.kernel_size[1]} s{dw.stride[0]}")
        if tuple(dw.dilation) != (1, 1):
            text += f" d{dw.dilation[0]}"
        return text + (" se" if self.parts.se else "") + (" +x" if self.parts.residual else "")

    def bundle(self, x: torch.Tensor) -> BlockArgs:
        """The op's argument bundle for input x, with this module's folded weights (checked, normalised)."""
        args = self.op_args(x)
        check_inverted_residual(args)
        return normalise_inverted_residual(args)

    def traffic(self, input_shape, element_size: int) -> dict:
        """Bytes one forward of the block must move across HBM under each plan, for an input of input_shape
        whose elements take element_size bytes (weights read once: x's dtype for compile, float32 folded else):
          compile  compile's plan: 1x1 convs with BN, activation and residual in their epilogues, the depthwise
                   conv (cuDNN) with its activation a separate pass, SE as pool + scale;
          layers   layer fusion: depthwise + BN + act in one pass, SE in its three launches, stock 1x1 convs with
                   compile's epilogues;
          block    block fusion: x in, y out; with SE the depthwise output d is written once and read once."""
        batch, channels, height, width = input_shape
        dw = self.part_modules[self.parts.dw_conv]
        (kh, kw), (sh, sw), (dh, dwl) = dw.kernel_size, dw.stride, dw.dilation
        top, bottom, left, right = self.op_padding
        out_h = (height + top + bottom - dh * (kh - 1) - 1) // sh + 1
        out_w = (width + left + right - dwl * (kw - 1) - 1) // sw + 1
        hidden, out_channels = dw.in_channels, self.w_project.shape[0]
        x = batch * channels * height * width * element_size
        h = batch * hidden * height * width * element_size if self.parts.expand_conv else x
        d = batch * hidden * out_h * out_w * element_size
        y = batch * out_channels * out_h * out_w * element_size
        weights = sum(getattr(self, name).numel() for name in _FOLDED if getattr(self, name) is not None)
        expand = x + h if self.parts.expand_conv else 0
        residual = x if self.parts.residual else 0
        se = 3 * d if self.parts.se else 0  # pool reads d; scale reads and writes it
        dw_act = 2 * d if self.parts.dw_activation != "identity" else 0
        return {
            "compile": expand + h + d + dw_act + se + d + y + residual + weights * element_size,
            "layers": expand + h + d + se + d + y + residual + weights * 4,
            "block": x + y + (2 * d + residual if self.parts.se else 0) + weights * 4,
        }

    def extra_repr(self) -> str:
        parts = self.parts
        acts = [parts.expand_activation if parts.expand_conv else None, parts.dw_activation,
                f"{parts.se_activation}/{parts.se_gate}" if parts.se else None,
                parts.post_se_activation if parts.se else None, parts.project_activation]
        return f"{self.shape}, activations={'-'.join(a for a in acts if a)}, fused=True"
