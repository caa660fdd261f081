"""InvertedResidual: a whole inverted-residual block (expand 1x1 -> BN -> act -> depthwise -> BN -> act -> [SE] ->
project 1x1 -> BN -> [+ x]) run as one fused op in inference.

Recognised by structure, never by class name: the block's modules in registration order (containers such as
nn.Sequential and torchvision's Conv2dNormActivation opened, identities such as DropPath / StochasticDepth /
Dropout in eval skipped) must read [1x1 conv, BN, act], depthwise conv, BN, [act], [SE, [act]], 1x1 conv, BN,
[act]. That covers timm's InvertedResidual and DepthwiseSeparableConv, torchvision's InvertedResidual (MobileNetV2
and V3) and MBConv, and hand-written blocks. Since a forward can compute anything (and only it says whether the
input is added back), a match is confirmed numerically in float64, with random BatchNorm statistics.

The module holds the stock block (its state_dict keys and values are the block's) and folds every BN into its conv
once, into float32 buffers laid out for the kernels; it refolds after load_state_dict, .to() / .half(), and when
switched to eval mode (training may have changed the statistics). Edits of the stock block's tensors in eval mode
need `refresh()`.
"""
import copy
from typing import NamedTuple, Optional

import torch
from torch import nn

from .. import activations, ops
from .._contract import (BlockArgs, check_inverted_residual, device_layout, input_major, normalise_inverted_residual,
                         tap_major)
from ..backends import reference
from ._cache import FusedModule
from .dwconv import check_depthwise, check_norm, static_padding, _fused_activation, _overrides_forward
from .squeeze_excite import _add_stock_prefix, _check_match, _drop_stock_prefix, _find_parts

# The stock block in float64 and the fused formula (float64, on fold_bn's float32 folded weights) must agree to
# this relative error: float32 rounding of the weights gives about 1e-7; a wrong structure is off by far more.
_MATCH_TOLERANCE = 1e-5
_FOLDED = ("w_expand", "b_expand", "w_dw", "b_dw", "w_se_reduce", "b_se_reduce", "w_se_expand", "b_se_expand",
           "w_project", "b_project")


class BlockParts(NamedTuple):
    """Paths of the stock modules inside the block (None: absent) and the fused op's settings."""
    expand_conv: Optional[str]
    expand_bn: Optional[str]
    expand_activation: str
    dw_conv: str
    dw_bn: str
    dw_activation: str
    se: Optional[str]
    se_activation: str
    se_gate: str
    se_reduce: Optional[str]  # the SE's reduce / expand layers, paths inside the block
    se_expand: Optional[str]
    post_se_activation: str
    project_conv: str
    project_bn: str
    project_activation: str
    residual: bool


# ------------------------------------------------------------------------------------------------ matching
def _holds(module: nn.Module, kind) -> bool:
    return any(isinstance(m, kind) for m in module.modules())


def _stateless(module: nn.Module) -> bool:
    return next(module.parameters(), None) is None and next(module.buffers(), None) is None


def _tokens(block: nn.Module, path: str = ""):
    """(kind, path, module) in registration order: kind 'conv', 'bn', 'se', 'act' (with its spec as module's
    partner) or an error; identities are dropped and containers opened."""
    for name, child in block.named_children():
        child_path = f"{path}{name}"
        if isinstance(child, nn.Conv2d):
            yield "conv", child_path, child
        elif isinstance(child, nn.BatchNorm2d):
            yield "bn", child_path, child
        elif _stateless(child):
            # An activation, or an identity in eval mode (DropPath, StochasticDepth, Dropout, timm's aa).
            spec = activations.identify_activation(copy.deepcopy(child).eval())
            if spec is None:
                raise ValueError(f"{child_path} ({type(child).__name__}) computes no known activation")
            if spec != "identity":
                yield "act", child_path, child
        elif not _holds(child, nn.BatchNorm2d):
            yield "se", child_path, child
        elif any(True for _ in child.children()):
            yield from _tokens(child, f"{child_path}.")
        else:
            raise ValueError(f"{child_path} is a {type(child).__name__} with parameters; not part of a block")


def _check_pointwise(conv: nn.Conv2d, path: str) -> None:
    if (tuple(conv.kernel_size) != (1, 1) or conv.groups != 1 or tuple(conv.stride) != (1, 1)
            or _overrides_forward(conv, nn.Conv2d) or static_padding(conv) != [0, 0, 0, 0]):
        raise ValueError(f"{path} is {conv}; a block's expand and project convs are plain 1x1 convs with stride 1, "
                         f"groups=1 and no padding")


class _Cursor:
    def __init__(self, tokens):
        self.tokens, self.at = tokens, 0

    def peek(self, kind: str):
        if self.at < len(self.tokens) and self.tokens[self.at][0] == kind:
            return self.tokens[self.at]
        return None

    def take(self, kind: str, what: str):
        token = self.peek(kind)
        if token is None:
            found = (f"{self.tokens[self.at][1]} ({type(self.tokens[self.at][2]).__name__})"
                     if self.at < len(self.tokens) else "the end of the block")
            raise ValueError(f"expected {what}, found {found}")
        self.at += 1
        return token[1], token[2]

    def optional(self, kind: str):
        token = self.peek(kind)
        if token is not None:
            self.at += 1
            return token[1], token[2]
        return None, None


def _conv_bn_act(cursor: _Cursor, what: str):
    """(conv path, bn path, activation spec) of a conv -> BN [-> act] run."""
    conv_path, conv = cursor.take("conv", what)
    bn_path, bn = cursor.take("bn", f"a BatchNorm2d after {conv_path}")
    check_norm(bn)
    _, act = cursor.optional("act")
    return conv_path, conv, bn_path, _fused_activation(bn, act)


def find_parts(block: nn.Module) -> BlockParts:
    """The block's parts (residual not yet known: False), or ValueError saying what did not match."""
    try:
        tokens = list(_tokens(block))
    except ValueError as error:
        raise ValueError(f"{type(block).__name__} is not an inverted-residual block: {error}") from None
    cursor = _Cursor(tokens)
    try:
        expand_conv = expand_bn = None
        expand_activation = "identity"
        first = cursor.peek("conv")
        if first is not None and first[2].groups == 1:
            expand_conv, conv, expand_bn, expand_activation = _conv_bn_act(cursor, "an expand 1x1 conv")
            _check_pointwise(conv, expand_conv)
        dw_conv, conv, dw_bn, dw_activation = _conv_bn_act(cursor, "a depthwise conv")
        check_depthwise(conv)
        if conv.out_channels != conv.in_channels or static_padding(conv) is None:
            raise ValueError(f"{dw_conv} is {conv}; a block's depthwise conv has depth multiplier 1 and a padding "
                             f"fixed at construction (not timm's Conv2dSame, which pads by the input's size)")
        se_path, se_module = cursor.optional("se")
        se = None
        post_se_activation = "identity"
        if se_module is not None:
            se = _find_parts(se_module)
            _check_match(se_module, se)
            _, act = cursor.optional("act")
            post_se_activation = _fused_activation(None, act)
        project_conv, conv, project_bn, project_activation = _conv_bn_act(cursor, "a project 1x1 conv")
        _check_pointwise(conv, project_conv)
        if cursor.at != len(tokens):
            _, path, module = tokens[cursor.at]
            raise ValueError(f"{path} ({type(module).__name__}) follows the project conv's BatchNorm")
    except ValueError as error:
        raise ValueError(f"{type(block).__name__} is not an inverted-residual block: {error}") from None
    return BlockParts(
        expand_conv, expand_bn, expand_activation, dw_conv, dw_bn, dw_activation,
        se_path, se.activation if se else "relu", se.gate if se else "sigmoid",
        f"{se_path}.{se.reduce}" if se else None, f"{se_path}.{se.expand}" if se else None,
        post_se_activation, project_conv, project_bn, project_activation, residual=False)


# ------------------------------------------------------------------------------------------------ folding
@torch.no_grad()
def fold(block: nn.Module, parts: BlockParts) -> dict:
    """The op's float32 weights of the block (BN folded), by argument name; absent parts give None."""
    get = block.get_submodule
    folded = dict.fromkeys(_FOLDED)
    if parts.expand_conv is not None:
        weight, folded["b_expand"] = ops.fold_bn(get(parts.expand_conv), get(parts.expand_bn))
        folded["w_expand"] = device_layout(weight.flatten(1), input_major)
    weight, folded["b_dw"] = ops.fold_bn(get(parts.dw_conv), get(parts.dw_bn))
    folded["w_dw"] = device_layout(weight, tap_major)
    if parts.se is not None:
        for layer, name in ((get(parts.se_reduce), "se_reduce"), (get(parts.se_expand), "se_expand")):
            folded[f"w_{name}"] = layer.weight.detach().flatten(1).to(torch.float32).contiguous()
            folded[f"b_{name}"] = None if layer.bias is None else layer.bias.detach().to(torch.float32).contiguous()
    weight, folded["b_project"] = ops.fold_bn(get(parts.project_conv), get(parts.project_bn))
    folded["w_project"] = device_layout(weight.flatten(1), input_major)
    return folded


def _bundle(x: torch.Tensor, block: nn.Module, parts: BlockParts, folded: dict, residual: bool) -> BlockArgs:
    dw_conv = block.get_submodule(parts.dw_conv)
    return BlockArgs(
        x=x, **folded, expand_activation=parts.expand_activation, stride=list(dw_conv.stride),
        padding=static_padding(dw_conv), dilation=list(dw_conv.dilation), dw_activation=parts.dw_activation,
        se_activation=parts.se_activation, se_gate=parts.se_gate, post_se_activation=parts.post_se_activation,
        project_activation=parts.project_activation, residual=residual)


@torch.no_grad()
def _residual_by_probe(block: nn.Module, parts: BlockParts) -> bool:
    """Whether the block adds its input back, from a float64 probe against the fused formula (with random BN
    statistics: fresh ones make a BN an identity and would hide a skipped one); ValueError when neither fits."""
    from ..patch import randomize_batchnorm  # patch imports this module

    probe_block = randomize_batchnorm(copy.deepcopy(block).to(device="cpu", dtype=torch.float64).eval(),
                                      torch.Generator().manual_seed(0))
    dw_conv = probe_block.get_submodule(parts.dw_conv)
    channels = (probe_block.get_submodule(parts.expand_conv) if parts.expand_conv else dw_conv).in_channels
    size = 5 + max(d * (k - 1) for d, k in zip(dw_conv.dilation, dw_conv.kernel_size))
    probe = torch.randn(2, channels, size, size + 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    try:
        stock = probe_block(probe.clone())
    except Exception as error:  # whatever a hand-written forward raises: not a block we can stand in for
        raise ValueError(f"{type(block).__name__} failed on a probe input of shape {tuple(probe.shape)}: "
                         f"{error}") from error
    folded = {k: None if v is None else v.to(torch.float64) for k, v in fold(probe_block, parts).items()}
    plain = reference.inverted_residual(_bundle(probe, probe_block, parts, folded, residual=False))
    if not isinstance(stock, torch.Tensor) or stock.shape != plain.shape:
        got = tuple(stock.shape) if isinstance(stock, torch.Tensor) else type(stock).__name__
        raise ValueError(f"{type(block).__name__} returned {got} for a probe of shape {tuple(probe.shape)}; the "
                         f"block's layers give {tuple(plain.shape)}")
    scale = stock.abs().max().clamp_min(1e-30)
    errors = {False: ((stock - plain).abs().max() / scale).item()}
    if plain.shape == probe.shape:
        errors[True] = ((stock - plain - probe).abs().max() / scale).item()
    residual = min(errors, key=errors.get)
    if not errors[residual] <= _MATCH_TOLERANCE:
        raise ValueError(
            f"{type(block).__name__} has the layers of an inverted-residual block but does not compute one: its "
            f"output differs from the fused formula by a relative {errors[residual]:.3g} on a float64 probe")
    return residual


# ------------------------------------------------------------------------------------------------ module
class InvertedResidual(FusedModule):
    """A stock inverted-residual block computed by `mbkernels.ops.inverted_residual` in inference.

    Build it with `InvertedResidual.from_module(block)`. The stock block stays inside as `stock` and runs
    unchanged in training mode or when autograd needs a graph; the state_dict has the block's own keys."""

    def __init__(self, stock: nn.Module, parts: BlockParts, backend: Optional[str] = None):
        super().__init__()
        self.stock = stock
        self.parts = parts
        self.backend = backend
        dw_conv = stock.get_submodule(parts.dw_conv)
        self.stride, self.dilation = list(dw_conv.stride), list(dw_conv.dilation)
        self.padding = static_padding(dw_conv)  # [top, bottom, left, right]
        for name in _FOLDED:
            self.register_buffer(name, None, persistent=False)
        self.refresh()
        self.training = stock.training  # swapped into a model in eval mode, it runs fused at once
        self.register_state_dict_post_hook(_drop_stock_prefix)
        self.register_load_state_dict_pre_hook(_add_stock_prefix)

    @classmethod
    def from_module(cls, block: nn.Module, backend: Optional[str] = None) -> "InvertedResidual":
        """Wrap a stock or hand-written block; ValueError saying what did not match for anything else."""
        if not isinstance(block, nn.Module):
            raise ValueError(f"expected an nn.Module, got {type(block).__name__}")
        if isinstance(block, InvertedResidual):
            raise ValueError("the module is already a fused InvertedResidual")
        parts = find_parts(block)
        parts = parts._replace(residual=_residual_by_probe(block, parts))
        return cls(block, parts, backend)

    def _fold_modules(self):
        return tuple(self.stock.modules())

    def _fold_settings(self) -> tuple:
        return tuple(m.eps for m in self.stock.modules() if isinstance(m, nn.BatchNorm2d))

    def _fold(self) -> dict:
        """The stock block's BNs folded into the float32 buffers the op reads."""
        return fold(self.stock, self.parts)

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            self.refresh()  # training updated the BN statistics
        return self

    def checked_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_fused_kernel(x):
            return self.stock(x)
        self.refresh_if_stale()
        args = _bundle(x, self.stock, self.parts, {name: getattr(self, name) for name in _FOLDED}, self.parts.residual)
        return self.run_op("inverted_residual", *args, self.backend or "")

    @property
    def shape(self) -> str:
        """C, E, O, the depthwise kernel and stride, SE and residual: "C=16 E=64 O=24 k3x3 s2 se +x"."""
        dw = self.stock.get_submodule(self.parts.dw_conv)
        first = self.stock.get_submodule(self.parts.expand_conv) if self.parts.expand_conv else dw
        text = (f"C={first.in_channels} E={dw.in_channels} O={self.w_project.shape[0]} "
                f"k{dw.kernel_size[0]}x{dw.kernel_size[1]} s{dw.stride[0]}")
        if tuple(dw.dilation) != (1, 1):
            text += f" d{dw.dilation[0]}"
        return text + (" se" if self.parts.se else "") + (" +x" if self.parts.residual else "")

    def bundle(self, x: torch.Tensor) -> BlockArgs:
        """The op's argument bundle for input x, with this module's folded weights (checked, normalised)."""
        args = _bundle(x, self.stock, self.parts, {name: getattr(self, name) for name in _FOLDED}, self.parts.residual)
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
        dw = self.stock.get_submodule(self.parts.dw_conv)
        (kh, kw), (sh, sw), (dh, dwl) = dw.kernel_size, dw.stride, dw.dilation
        top, bottom, left, right = self.padding
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
