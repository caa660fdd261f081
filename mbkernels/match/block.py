"""Inverted-residual blocks in a module tree: the expand, depthwise, SE and project layers of a block module, read in
registration order; whether it adds its input back the probe decides (mbkernels.nn.inverted_residual).
"""
import copy
from typing import NamedTuple, Optional

from torch import nn

from .. import activations
from .layers import check_depthwise, check_norm, fused_activation, is_depthwise
from .padding import static_padding
from .se import find_se_parts


# ------------------------------------------------------------------------------------ inverted-residual block
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
    se_norm: Optional[str] = None  # a BatchNorm inside the SE, after its reduce layer


def holds_one_block(module: nn.Module) -> bool:
    """Worth offering as an inverted-residual block: one depthwise conv, one or two 1x1 convs, BatchNorms."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    depthwise = sum(is_depthwise(conv) for conv in convs)
    pointwise = sum(tuple(conv.kernel_size) == (1, 1) and conv.groups == 1 for conv in convs)
    return depthwise == 1 and pointwise >= 1 and any(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def _holds(module: nn.Module, kind) -> bool:
    return any(isinstance(m, kind) for m in module.modules())


def _stateless(module: nn.Module) -> bool:
    return next(module.parameters(), None) is None and next(module.buffers(), None) is None


def _block_tokens(block: nn.Module, path: str = ""):
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
        elif not _holds(child, nn.BatchNorm2d) or _is_se(child):
            yield "se", child_path, child
        elif any(True for _ in child.children()):
            yield from _block_tokens(child, f"{child_path}.")
        else:
            raise ValueError(f"{child_path} is a {type(child).__name__} with parameters; not part of a block")


def _is_se(module: nn.Module) -> bool:
    try:
        find_se_parts(module)
    except ValueError:
        return False
    return True


def _check_pointwise(conv: nn.Conv2d, path: str) -> None:
    if (tuple(conv.kernel_size) != (1, 1) or conv.groups != 1 or tuple(conv.stride) != (1, 1)
            or conv.padding_mode != "zeros" or _padding_or_none(conv) != [0, 0, 0, 0]):
        raise ValueError(f"{path} is {conv}; a block's expand and project convs are plain 1x1 convs with stride 1, "
                         f"groups=1 and no padding")


def _padding_or_none(conv: nn.Conv2d) -> Optional[list[int]]:
    try:
        return static_padding(conv)
    except ValueError:
        return None


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
    """(conv path, conv, bn path, activation spec) of a conv -> BN [-> act] run."""
    conv_path, conv = cursor.take("conv", what)
    bn_path, bn = cursor.take("bn", f"a BatchNorm2d after {conv_path}")
    check_norm(bn)
    _, act = cursor.optional("act")
    return conv_path, conv, bn_path, fused_activation(bn, act)


def find_block_parts(block: nn.Module) -> BlockParts:
    """The block's parts in registration order (residual not yet known: False; the probe decides it), or
    ValueError saying what did not match."""
    try:
        tokens = list(_block_tokens(block))
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
            raise ValueError(f"{dw_conv} is {conv}; a block's depthwise conv has depth multiplier 1 and a fixed "
                             f"padding (not TensorFlow 'SAME' at a stride, which pads by the input's size)")
        se_path, se_module = cursor.optional("se")
        se = None
        post_se_activation = "identity"
        if se_module is not None:
            se = find_se_parts(se_module)
            _, act = cursor.optional("act")
            post_se_activation = fused_activation(None, act)
        project_conv, conv, project_bn, project_activation = _conv_bn_act(cursor, "a project 1x1 conv")
        _check_pointwise(conv, project_conv)
        if cursor.at != len(tokens):
            _, path, module = tokens[cursor.at]
            raise ValueError(f"{path} ({type(module).__name__}) follows the project conv's BatchNorm")
    except ValueError as error:
        raise ValueError(f"{type(block).__name__} is not an inverted-residual block: {error}") from None
    inner = (lambda path: f"{se_path}.{path}" if path else None)
    return BlockParts(
        expand_conv, expand_bn, expand_activation, dw_conv, dw_bn, dw_activation,
        se_path, se.activation if se else "relu", se.gate if se else "sigmoid",
        inner(se.reduce) if se else None, inner(se.expand) if se else None,
        post_se_activation, project_conv, project_bn, project_activation, residual=False,
        se_norm=inner(se.norm) if se else None)
