"""Squeeze-excite modules in a module tree: the two layers (or the one of an effective SE), the activation, the gate,
a BatchNorm folded into the reduce layer, recognised by module types and by what parameter-free modules compute.
"""
from typing import NamedTuple, Optional

from torch import nn

from .. import activations


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
