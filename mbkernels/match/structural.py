"""Structural matching: what a module tree says a fusable computation is, before a probe proves it.

Never by class or model names: by module types that PyTorch defines (nn.Conv2d, nn.BatchNorm2d, nn.Linear), by
which classes override forward, and by what parameter-free modules compute (activations and gates are recognised
numerically, mbkernels.activations). What a structure cannot tell (what a hand-written forward really applies,
whether a block adds its input back) the probe decides (mbkernels.match.probe).
"""
import copy
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import activations


# ------------------------------------------------------------------------------------ convs and norms
def overrides_forward(module: nn.Module, base: type) -> bool:
    return type(module).forward is not base.forward


def is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and not overrides_forward(module, nn.Sequential)


def tf_same_padding(size: tuple, conv: nn.Conv2d) -> list[int]:
    """[top, bottom, left, right] that TensorFlow 'SAME' (timm's pad_same) gives an input plane of `size`: the
    total that makes the output ceil(size / stride), its odd pixel at the bottom / right."""
    padding = []
    for length, k, s, d in zip(size, conv.kernel_size, conv.stride, conv.dilation):
        # (ceil(length / s) - 1) * s + (k - 1) * d + 1 - length depends on length % s alone. Found by comparison,
        # the remainder is a plain int even for a symbolic length (torch.compile, dynamic shapes: a guard on it).
        remainder = next(r for r in range(s) if length % s == r)
        total = max((s - remainder) % s - s + (k - 1) * d + 1, 0)
        padding += [total // 2, total - total // 2]
    return padding


def attribute_padding(conv: nn.Conv2d) -> list[int]:
    """nn.Conv2d's own zero padding, from its attributes, as [top, bottom, left, right]."""
    if conv.padding == "valid":
        return [0, 0, 0, 0]
    if conv.padding == "same":
        # PyTorch's 'same' (stride 1 only): the odd pixel of an even total goes at the bottom / right.
        padding = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            padding += [total // 2, total - total // 2]
        return padding
    return [conv.padding[0], conv.padding[0], conv.padding[1], conv.padding[1]]


def static_padding(conv: nn.Conv2d) -> Optional[list[int]]:
    """conv's zero padding as the [top, bottom, left, right] the ops take, or None when it is TensorFlow 'SAME'
    computed from the input's size at every call (see tf_same_padding). nn.Conv2d's own forward pads by its
    attributes; a subclass that overrides forward is recognised by what it computes (identify_padding);
    ValueError when it computes no zero-padded conv of its weights."""
    if not overrides_forward(conv, nn.Conv2d):
        return attribute_padding(conv)
    return identify_padding(conv)


# a conv's configuration (see _configuration) -> its identified padding (a tuple, or "same"), or the ValueError
# message: the planner asks for every copy it probes, and models repeat a few configurations many times
_IDENTIFIED = {}
_IDENTIFY_TOLERANCE = 1e-9  # float64: the same conv of the same weights agrees to rounding
_TF_SAME = "same"


def identify_padding(conv: nn.Conv2d) -> Optional[list[int]]:
    """The padding a Conv2d subclass with its own forward applies, found on float64 probes of several sizes (every
    remainder of the stride): its attributes' padding (a forward that adds nothing), a zero-padding child's padding
    plus that (efficientnet_pytorch's Conv2dStaticSamePadding: a ZeroPad2d fixed at construction), or TensorFlow
    'SAME' (timm's Conv2dSame, efficientnet_pytorch's Conv2dDynamicSamePadding; a plain list at stride 1, where it
    does not depend on the size). ValueError when it computes none of them (e.g. standardised weights)."""
    key = _configuration(conv)
    known = _IDENTIFIED.get(key)
    if known is None:
        known = _IDENTIFIED[key] = _identify_padding(conv)
    if isinstance(known, ValueError):
        raise ValueError(str(known))
    return None if known == _TF_SAME else list(known)


def _configuration(module: nn.Module) -> tuple:
    """What a module's forward may depend on besides its tensors: its class and its plain attributes, and those of
    its submodules (a ZeroPad2d's padding)."""
    settings = tuple(sorted((name, value) for name, value in vars(module).items()
                            if isinstance(value, (bool, int, float, str, tuple)) and not name.startswith("_")))
    return (type(module), settings, tuple(_configuration(child) for child in module.children()))


@torch.no_grad()
def _identify_padding(conv: nn.Conv2d):
    own = attribute_padding(conv)
    candidates = [own]
    pads = [m for m in conv.modules() if isinstance(m, nn.ConstantPad2d) and float(m.value) == 0.0]
    if len(pads) == 1:
        left, right, top, bottom = pads[0].padding
        candidates.append([own[0] + top, own[1] + bottom, own[2] + left, own[3] + right])
    candidates.append(_TF_SAME)
    probe = copy.deepcopy(conv).to(device="cpu", dtype=torch.float64).eval()
    generator = torch.Generator().manual_seed(0)
    reach = [d * (k - 1) + 1 for k, d in zip(conv.kernel_size, conv.dilation)]
    sizes = [(reach[0] + 2 * conv.stride[0] + i, reach[1] + 2 * conv.stride[1] + i + 1)
             for i in range(max(conv.stride) + 1)]
    inputs = [torch.randn(1, conv.in_channels, h, w, dtype=torch.float64, generator=generator) for h, w in sizes]
    try:
        outputs = [probe(x) for x in inputs]
    except Exception as error:  # whatever the forward raises: nothing we can stand in for
        return ValueError(f"conv is a {type(conv).__name__} whose forward fails on a probe: {type(error).__name__}: "
                          f"{error}")
    for candidate in candidates:
        matches = True
        for x, out in zip(inputs, outputs):
            top, bottom, left, right = tf_same_padding(x.shape[2:], conv) if candidate == _TF_SAME else candidate
            want = F.conv2d(F.pad(x, [left, right, top, bottom]), probe.weight, probe.bias, conv.stride, 0,
                            conv.dilation, conv.groups)
            if not (isinstance(out, torch.Tensor) and out.shape == want.shape and (out - want).abs().max()
                    <= _IDENTIFY_TOLERANCE * want.abs().max().clamp_min(1e-30)):
                matches = False
                break
        if matches:
            if candidate == _TF_SAME and tuple(conv.stride) == (1, 1):
                return tuple(tf_same_padding(sizes[0], conv))  # at stride 1 the same at every size
            return candidate if candidate == _TF_SAME else tuple(candidate)
    return ValueError(f"conv is a {type(conv).__name__}, whose forward differs from nn.Conv2d's and computes no "
                      f"zero-padded conv of its weights on probes (neither its own padding, a zero-padding module "
                      f"before it, nor TensorFlow 'SAME')")


def is_depthwise(module: nn.Module) -> bool:
    """A Conv2d with one group per input channel (any depth multiplier), more than one channel."""
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1


def check_depthwise(conv: nn.Module) -> None:
    """Raise ValueError naming what keeps `conv` from being a fusable depthwise conv."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    if not (conv.groups == conv.in_channels and conv.out_channels % conv.in_channels == 0):
        raise ValueError(
            f"conv is not depthwise: groups={conv.groups}, in_channels={conv.in_channels}, "
            f"out_channels={conv.out_channels} (groups must equal in_channels, and out_channels be a multiple of it)"
        )
    check_conv_forward(conv, "fused")


def check_conv_forward(conv: nn.Module, done: str) -> None:
    """Raise ValueError when conv pads other than with zeros, or its forward computes no zero-padded conv of its
    weights (see static_padding); `done` says what would be done with it ("fused", "folded")."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv has padding_mode={conv.padding_mode!r}; only zero padding is {done}")
    static_padding(conv)


def carried_activation(bn: nn.Module) -> Optional[nn.Module]:
    """The activation a norm-plus-activation module applies after normalising (timm's BatchNormAct2d: bn.act,
    after bn.drop, which is an identity in eval mode), or None for a plain BatchNorm2d."""
    if isinstance(bn, nn.BatchNorm2d) and overrides_forward(bn, nn.BatchNorm2d):
        act = getattr(bn, "act", None)
        return act if isinstance(act, nn.Module) else None
    return None


def check_norm(bn: nn.Module) -> None:
    """Raise ValueError naming what keeps `bn` from being folded into the conv."""
    if not isinstance(bn, nn.BatchNorm2d):
        raise ValueError(f"expected an nn.BatchNorm2d, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{type(bn).__name__} has no running statistics (track_running_stats=False): it normalises with "
            "batch statistics and cannot be folded"
        )
    if overrides_forward(bn, nn.BatchNorm2d) and carried_activation(bn) is None:
        raise ValueError(
            f"{type(bn).__name__} overrides BatchNorm2d.forward without an `act` module; "
            "what it computes after normalising is unknown"
        )


def activation_name(act: Optional[nn.Module]) -> str:
    """The fused-op spec of a stock or hand-written activation module (None or nn.Identity: 'identity')."""
    if act is None:
        return "identity"
    name = activations.identify_activation(act)
    if name is None:
        raise ValueError(
            f"activation {type(act).__name__} has no fused kernel; supported: {', '.join(activations.ACTIVATIONS)}"
        )
    return name


def fused_activation(bn: Optional[nn.Module], act: Optional[nn.Module]) -> str:
    """The one activation spec applied after a conv's norm: the norm's own (BatchNormAct2d) or the next module's."""
    names = [activation_name(m) for m in (carried_activation(bn) if bn is not None else None, act)]
    applied = [n for n in names if n != "identity"]
    if len(applied) > 1:
        raise ValueError(f"two activations follow the norm ({' then '.join(applied)}); only one is fused")
    return applied[0] if applied else "identity"


def is_activation_module(module: nn.Module) -> bool:
    """A parameter-free module from an activations module (torch.nn's, timm's): an activation we may lack."""
    origin = type(module).__module__
    stateless = next(module.parameters(), None) is None and next(module.children(), None) is None
    return stateless and ("activation" in origin) and not isinstance(module, nn.Identity)


def following(children: list, i: int) -> list:
    """(slot, module) of what follows children[i] in the parent, a plain Sequential that starts with a BatchNorm
    (conv -> Sequential(BN, act)) opened into its children ("5.0", "5.1")."""
    found = []
    for name, child in children[i + 1:]:
        if is_plain_sequential(child) and isinstance(next(child.children(), None), nn.BatchNorm2d):
            found += [(f"{name}.{inner}", m) for inner, m in child.named_children()]
        else:
            found.append((name, child))
    return found


# ------------------------------------------------------------------------------------ squeeze-excite
# Modules an SE may hold around its MLP that the fused op's formula already covers (pooling, reshaping).
_PASSTHROUGH = (nn.AdaptiveAvgPool2d, nn.Flatten, nn.Unflatten, nn.Identity)


class SEParts(NamedTuple):
    reduce: str  # the path of the nn.Linear [C -> R] or 1x1 nn.Conv2d inside the module
    expand: Optional[str]  # the path of the nn.Linear [R -> C] or 1x1 nn.Conv2d; None: a one-layer (effective) SE
    activation: str
    gate: str
    norm: Optional[str] = None  # the path of a BatchNorm applied to the reduce layer's output, folded into it


def se_layers(module: nn.Module):
    """The two layers of an SE-like module ((in, out) of each), or None: its only weight-holding submodules are
    two Linear / 1x1 Conv2d layers C -> R -> C with R < C (and BatchNorms, which SqueezeExcite folds or refuses)."""
    leaves = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None
              and not isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if len(leaves) != 2:
        return None
    shapes = []
    for layer in leaves:
        if isinstance(layer, nn.Linear):
            shapes.append((layer.in_features, layer.out_features))
        elif isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (1, 1) and layer.groups == 1:
            shapes.append((layer.in_channels, layer.out_channels))
        else:
            return None
    (c_in, reduced), (r_in, c_out) = shapes
    return shapes if reduced == r_in and c_in == c_out and reduced < c_in else None


def gated_layers(module: nn.Module) -> list:
    """The Linear / 1x1-conv children of a module that also has a gate child (sigmoid, hardsigmoid): an SE-like
    module (an effective SE's one layer, an SE's two); [] for anything else."""
    children = list(module.children())
    if not any(activations.identify_gate(child) is not None for child in children):
        return []
    return [child for child in children if isinstance(child, nn.Linear)
            or (isinstance(child, nn.Conv2d) and tuple(child.kernel_size) == (1, 1))]


def layer_in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def se_channels(module: nn.Module) -> Optional[int]:
    """The input channels of an SE-like module (two layers C -> R -> C, or a gate with 1x1 layers), else None."""
    layers = se_layers(module)
    if layers:
        return layers[0][0]
    gated = gated_layers(module)
    return layer_in_channels(gated[0]) if gated else None


def se_shape(module: nn.Module) -> str:
    layers = se_layers(module)
    if layers:
        return f"C={layers[0][0]} R={layers[0][1]}"
    channels = se_channels(module)
    return f"C={channels}" if channels is not None else ""


def _check_se_layer(layer: nn.Module, name: str) -> None:
    if isinstance(layer, nn.Conv2d):
        if layer.kernel_size != (1, 1) or layer.groups != 1 or layer.padding not in ((0, 0), "valid"):
            raise ValueError(
                f"{name} is {layer}; only an nn.Linear or a 1x1 nn.Conv2d with groups=1 and no padding can be fused"
            )


def _se_leaf_parts(module: nn.Module, path: str = ""):
    """(path, module, kind) in registration order: kind 'layer' (Linear / Conv2d) or 'function' (parameter-free,
    e.g. an activation); pooling and reshaping modules are skipped, containers opened."""
    for name, child in module.named_children():
        child_path = f"{path}{name}"
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            yield child_path, child, "layer"
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            yield child_path, child, "norm"
        elif isinstance(child, _PASSTHROUGH):
            if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size not in (1, (1, 1)):
                raise ValueError(f"{child_path} is {child}; only a global average pool (output_size=1) can be fused")
        elif not any(True for _ in child.parameters()) and not any(True for _ in child.buffers()):
            yield child_path, child, "function"
        elif any(True for _ in child.children()):
            yield from _se_leaf_parts(child, f"{child_path}.")
        else:
            raise ValueError(f"{child_path} is a {type(child).__name__} with parameters; an SE holds only its two "
                             f"linear layers, an activation and a gate")
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        raise ValueError(f"{path or 'the module'} holds parameters or buffers of its own outside its layers")


def find_se_parts(module: nn.Module) -> SEParts:
    """The parts of a squeeze-excite module (its layers, norm, activation and gate), or ValueError saying what did
    not match. What its forward does with them the probe proves."""
    try:
        parts = list(_se_leaf_parts(module))
    except ValueError as error:
        raise ValueError(f"{type(module).__name__} is not a squeeze-excite module: {error}") from None
    layers = [(path, m) for path, m, kind in parts if kind == "layer"]
    norms = [(path, m) for path, m, kind in parts if kind == "norm"]
    functions = [(path, m) for path, m, kind in parts if kind == "function"]
    if len(layers) == 1 and not norms and functions:
        return _one_layer_parts(module, layers[0], functions)
    if len(layers) != 2 or len(functions) < 2:
        found = ", ".join(f"{path} ({type(m).__name__})" for path, m, _ in parts) or "nothing"
        raise ValueError(
            f"{type(module).__name__} is not a squeeze-excite module: expected two linear or 1x1 conv layers, an "
            f"activation and a gate, found {found}"
        )
    for path, layer in layers:
        _check_se_layer(layer, path)
    (first_path, first), (second_path, second) = layers
    # Registration order is not forward order (torchvision registers fc1, fc2, then the activations): tell the
    # reduce layer from the expand layer by their shapes where they differ.
    first_in, first_out = first.weight.shape[1], first.weight.shape[0]
    second_in, second_out = second.weight.shape[1], second.weight.shape[0]
    if first_out != second_in or second_out != first_in:
        raise ValueError(
            f"{first_path} maps {first_in} -> {first_out} channels and {second_path} {second_in} -> {second_out}; "
            f"an SE's layers map C -> R -> C"
        )
    reduce, expand = (second_path, first_path) if first_in < first_out else (first_path, second_path)
    norm = _find_se_norm(module, norms, min(first_in, first_out))

    names, activation, gate = _se_functions(functions)
    if len(activation) != 1 or len(gate) != 1:
        found = ", ".join(f"{path} ({type(f).__name__}) computes {name or 'no known function'}"
                          for path, f, name in names)
        raise ValueError(
            f"{type(module).__name__} needs one activation ({', '.join(activations.ACTIVATIONS[1:])}) and one gate "
            f"({', '.join(activations.GATES)}): {found}"
        )
    return SEParts(reduce, expand, activation[0], gate[0], norm)


def _se_functions(functions: list):
    """(path, module, name) of each parameter-free part, the activations and the gates among the names."""
    # Hand-written activations are recognised by what they compute (the two name sets do not overlap). Other
    # parameter-free modules (a hand-written Flatten, Dropout) are let through: the probe judges them.
    names = [(path, function, activations.identify_activation(function) or activations.identify_gate(function))
             for path, function in functions]
    # An identity (a hand-written Dropout in eval) is no activation here: the probe judges it.
    gates = [name for _, _, name in names if name is not None and activations.is_gate(name)]
    activation = [name for _, _, name in names if name is not None and name != "identity" and name not in gates]
    return names, activation, gates


def _one_layer_parts(module: nn.Module, layer_item: tuple, functions: list) -> SEParts:
    """An effective SE (timm's EffectiveSEModule, hgnet's EseModule): x * gate(W @ mean_hw(x) + b), W [C, C]. The
    op runs it with W as the reduce layer, no activation, and the identity as the expand layer (exact: each output
    is 1 * the value plus exact zeros)."""
    path, layer = layer_item
    _check_se_layer(layer, path)
    if layer.weight.shape[0] != layer.weight.shape[1]:
        raise ValueError(f"{type(module).__name__} has one layer, {path}, mapping {layer.weight.shape[1]} -> "
                         f"{layer.weight.shape[0]} channels; a one-layer (effective) SE maps C -> C")
    names, activation, gate = _se_functions(functions)
    if activation or len(gate) != 1:
        found = ", ".join(f"{p} ({type(f).__name__}) computes {name or 'no known function'}" for p, f, name in names)
        raise ValueError(f"{type(module).__name__} with one layer needs one gate ({', '.join(activations.GATES)}) "
                         f"and no activation: {found}")
    return SEParts(path, None, "identity", gate[0])


def _find_se_norm(module: nn.Module, norms: list, reduced: int) -> Optional[str]:
    """The path of the one BatchNorm of R features an SE may hold (which the probe proves is applied to the reduce
    layer's output), or None."""
    if not norms:
        return None
    if len(norms) > 1:
        raise ValueError(f"{type(module).__name__} holds {len(norms)} norms ({', '.join(p for p, _ in norms)}); "
                         "an SE with one BatchNorm after its reduce layer is fused")
    path, norm = norms[0]
    if norm.num_features != reduced or norm.running_mean is None or norm.running_var is None:
        problem = f"of {norm.num_features} features" if norm.num_features != reduced else "without running statistics"
        raise ValueError(f"{type(module).__name__}.{path} is a {type(norm).__name__} {problem}; only a BatchNorm of "
                         f"the {reduced} reduced channels with running statistics can be folded into the reduce layer")
    return path


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
