"""SqueezeExcite: a stock squeeze-and-excite module run as one fused op in inference.

Recognised sources: timm's SqueezeExcite (conv_reduce, act1, conv_expand, gate) and SEModule (also with a
BatchNorm between fc1 and its activation, as rexnet's: folded into fc1) and EffectiveSEModule (one layer C -> C,
as hgnet's EseModule: the op's expand layer is then the identity), torchvision's SqueezeExcitation (avgpool, fc1,
activation, fc2, scale_activation), and hand-written SE modules whose layers are two nn.Linear or 1x1 nn.Conv2d
with an activation and a gate module (also inside an nn.Sequential). Since a hand-written forward can compute anything, a match is confirmed numerically.
"""
import copy
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import activations, ops
from ._cache import FusedModule

# Modules an SE may hold around its MLP that the fused op's formula already covers (pooling, reshaping).
_PASSTHROUGH = (nn.AdaptiveAvgPool2d, nn.Flatten, nn.Unflatten, nn.Identity)
# The stock module and the fused formula, both in float64, must agree to this relative error.
_MATCH_TOLERANCE = 1e-9


class _Parts(NamedTuple):
    reduce: str  # the path of the nn.Linear [C -> R] or 1x1 nn.Conv2d inside the module
    expand: Optional[str]  # the path of the nn.Linear [R -> C] or 1x1 nn.Conv2d; None: a one-layer (effective) SE
    activation: str
    gate: str
    norm: Optional[str] = None  # the path of a BatchNorm applied to the reduce layer's output, folded into it


def _check_layer(layer: nn.Module, name: str) -> None:
    if isinstance(layer, nn.Conv2d):
        if layer.kernel_size != (1, 1) or layer.groups != 1 or layer.padding not in ((0, 0), "valid"):
            raise ValueError(
                f"{name} is {layer}; only an nn.Linear or a 1x1 nn.Conv2d with groups=1 and no padding can be fused"
            )


def _leaf_parts(module: nn.Module, path: str = ""):
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
            yield from _leaf_parts(child, f"{child_path}.")
        else:
            raise ValueError(f"{child_path} is a {type(child).__name__} with parameters; an SE holds only its two "
                             f"linear layers, an activation and a gate")
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        raise ValueError(f"{path or 'the module'} holds parameters or buffers of its own outside its layers")


def _find_parts(module: nn.Module) -> _Parts:
    try:
        parts = list(_leaf_parts(module))
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
        _check_layer(layer, path)
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
    norm = _find_norm(module, norms, min(first_in, first_out))

    names, activation, gate = _functions(functions)
    if len(activation) != 1 or len(gate) != 1:
        found = ", ".join(f"{path} ({type(f).__name__}) computes {name or 'no known function'}"
                          for path, f, name in names)
        raise ValueError(
            f"{type(module).__name__} needs one activation ({', '.join(activations.ACTIVATIONS[1:])}) and one gate "
            f"({', '.join(activations.GATES)}): {found}"
        )
    return _Parts(reduce, expand, activation[0], gate[0], norm)


def _functions(functions: list):
    """(path, module, name) of each parameter-free part, the activations and the gates among the names."""
    # Hand-written activations are recognised by what they compute (the two name sets do not overlap). Other
    # parameter-free modules (a hand-written Flatten, Dropout) are let through: the numeric check judges them.
    names = [(path, function, activations.identify_activation(function) or activations.identify_gate(function))
             for path, function in functions]
    # An identity (a hand-written Dropout in eval) is no activation here: the numeric check judges it.
    activation = [name for _, _, name in names if name is not None and name != "identity" and name not in
                  activations.GATES]
    gate = [name for _, _, name in names if name in activations.GATES]
    return names, activation, gate


def _one_layer_parts(module: nn.Module, layer_item: tuple, functions: list) -> _Parts:
    """An effective SE (timm's EffectiveSEModule, hgnet's EseModule): x * gate(W @ mean_hw(x) + b), W [C, C]. The
    op runs it with W as the reduce layer, no activation, and the identity as the expand layer (exact: each output
    is 1 * the value plus exact zeros)."""
    path, layer = layer_item
    _check_layer(layer, path)
    if layer.weight.shape[0] != layer.weight.shape[1]:
        raise ValueError(f"{type(module).__name__} has one layer, {path}, mapping {layer.weight.shape[1]} -> "
                         f"{layer.weight.shape[0]} channels; a one-layer (effective) SE maps C -> C")
    names, activation, gate = _functions(functions)
    if activation or len(gate) != 1:
        found = ", ".join(f"{p} ({type(f).__name__}) computes {name or 'no known function'}" for p, f, name in names)
        raise ValueError(f"{type(module).__name__} with one layer needs one gate ({', '.join(activations.GATES)}) "
                         f"and no activation: {found}")
    return _Parts(path, None, "identity", gate[0])


def _expand_weights(expand: Optional[nn.Module], channels: int, dtype: torch.dtype, device):
    """(w_expand [C, R], b_expand) in dtype; the identity for a one-layer SE."""
    if expand is None:
        return torch.eye(channels, dtype=dtype, device=device), None
    bias = None if expand.bias is None else expand.bias.detach().to(dtype).contiguous()
    return expand.weight.detach().flatten(1).to(dtype).contiguous(), bias


def _find_norm(module: nn.Module, norms: list, reduced: int) -> Optional[str]:
    """The path of the one BatchNorm of R features an SE may hold (which the match check proves is applied to the
    reduce layer's output), or None."""
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


def _reduce_weights(reduce: nn.Module, norm: Optional[nn.Module], dtype: torch.dtype):
    """(w_reduce [R, C], b_reduce) in dtype, the norm folded in (b_reduce None when there is neither bias nor norm)."""
    weight = reduce.weight.detach().flatten(1).to(dtype)
    bias = None if reduce.bias is None else reduce.bias.detach().to(dtype)
    if norm is None:
        return weight.contiguous(), bias
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device)
    return ops.fold_bn_into(weight, bias, norm)


def _fused_formula(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate) -> torch.Tensor:
    """The fused op's math in x's dtype (float64 for the match check)."""
    pooled = x.mean(dim=(2, 3))
    hidden = activations.apply_activation(activation, F.linear(pooled, w_reduce, b_reduce))
    scale = activations.apply_gate(gate, F.linear(hidden, w_expand, b_expand))
    return x * scale[:, :, None, None]


@torch.no_grad()
def _check_match(module: nn.Module, parts: _Parts) -> bool:
    """Raises unless `module` computes the fused formula on a float64 probe; returns whether it writes into x."""
    probe_module = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).eval()
    reduce = probe_module.get_submodule(parts.reduce)
    expand = probe_module.get_submodule(parts.expand) if parts.expand else None
    channels = reduce.weight.shape[1]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(3, channels, 5, 4, generator=generator, dtype=torch.float64) * 2
    probe_input = probe.clone()
    try:
        stock = probe_module(probe_input)
    except Exception as error:  # whatever a hand-written forward raises: it is not an SE we can stand in for
        raise ValueError(
            f"{type(module).__name__} failed on a probe input of shape {tuple(probe.shape)}: {error}") from error
    writes_input = not torch.equal(probe_input, probe)
    norm = probe_module.get_submodule(parts.norm) if parts.norm else None
    w_reduce, b_reduce = _reduce_weights(reduce, norm, torch.float64)
    w_expand, b_expand = _expand_weights(expand, channels, torch.float64, probe.device)
    fused = _fused_formula(probe, w_reduce, b_reduce, w_expand, b_expand, parts.activation, parts.gate)
    if not isinstance(stock, torch.Tensor) or stock.shape != fused.shape:
        got = tuple(stock.shape) if isinstance(stock, torch.Tensor) else type(stock).__name__
        raise ValueError(f"{type(module).__name__} returned {got} for an input of shape {tuple(probe.shape)}; "
                         f"a squeeze-excite module returns x's shape")
    error = ((stock - fused).abs().max() / fused.abs().max().clamp_min(1e-30)).item()
    if not error <= _MATCH_TOLERANCE:
        raise ValueError(
            f"{type(module).__name__} has the layers of a squeeze-excite module ({parts.activation}, {parts.gate}) "
            f"but does not compute one: its output differs from the fused formula by a relative {error:.3g} "
            f"on a float64 probe"
        )
    return writes_input


class SqueezeExcite(FusedModule):
    """x * gate(expand(act(reduce(mean_hw(x))))) computed by `mbkernels.ops.squeeze_excite` in inference.

    Build it with `SqueezeExcite.from_module(se)`. The stock module stays inside as `stock` and runs unchanged in
    training mode or when autograd needs a graph; the state_dict has the stock module's keys, so checkpoints load
    both ways. The float32 weights are buffers made when the module is built and refreshed when a parameter
    changes (see FusedModule).
    """

    def __init__(self, stock: nn.Module, parts: _Parts, stock_writes_input: bool, backend: Optional[str] = None):
        super().__init__()
        self.stock = stock
        self.reduce_path, self.expand_path, self.norm_path = parts.reduce, parts.expand, parts.norm
        self.activation, self.gate = parts.activation, parts.gate
        self.stock_writes_input = stock_writes_input
        self.backend = backend
        self.training = stock.training  # swapped into a model in eval mode, it runs fused at once
        self.register_state_dict_post_hook(_drop_stock_prefix)
        self.register_load_state_dict_pre_hook(_add_stock_prefix)
        self.refresh()

    @classmethod
    def from_module(cls, module: nn.Module, backend: Optional[str] = None) -> "SqueezeExcite":
        """Wrap a stock or hand-written SE module; ValueError saying what did not match for anything else."""
        if not isinstance(module, nn.Module):
            raise ValueError(f"expected an nn.Module, got {type(module).__name__}")
        if isinstance(module, SqueezeExcite):
            raise ValueError("the module is already a fused SqueezeExcite")
        parts = _find_parts(module)
        writes_input = _check_match(module, parts)
        return cls(module, parts, writes_input, backend)

    @property
    def reduce_layer(self) -> nn.Module:
        return self.stock.get_submodule(self.reduce_path)

    @property
    def expand_layer(self) -> Optional[nn.Module]:
        return self.stock.get_submodule(self.expand_path) if self.expand_path else None

    def _fold_modules(self) -> tuple:
        return self.reduce_layer, self.expand_layer, self._norm()

    def _norm(self) -> Optional[nn.Module]:
        return self.stock.get_submodule(self.norm_path) if self.norm_path else None

    def _fold_settings(self) -> tuple:
        norm = self._norm()
        return (norm.eps,) if norm is not None else ()

    def _fold(self) -> dict:
        reduce, expand = self.reduce_layer, self.expand_layer
        w_reduce, b_reduce = _reduce_weights(reduce, self._norm(), torch.float32)
        w_expand, b_expand = _expand_weights(expand, reduce.weight.shape[1], torch.float32, reduce.weight.device)
        return {"folded_w_reduce": w_reduce, "folded_b_reduce": b_reduce,
                "folded_w_expand": w_expand, "folded_b_expand": b_expand}

    def fused_weights(self):
        """The float32 (w_reduce [R, C], b_reduce, w_expand [C, R], b_expand) the fused op gets."""
        self.refresh_if_stale()
        return self.folded_w_reduce, self.folded_b_reduce, self.folded_w_expand, self.folded_b_expand

    def checked_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_fused_kernel(x):
            # The stock module as it is, except that it may not scale the caller's x in place.
            return self.stock(x.clone() if self.stock_writes_input else x)
        w_reduce, b_reduce, w_expand, b_expand = self.fused_weights()
        return self.run_op("squeeze_excite", x, w_reduce, b_reduce, w_expand, b_expand, self.activation, self.gate,
                           self.backend or "")

    def extra_repr(self) -> str:
        reduced_channels, channels = self.reduce_layer.weight.shape[:2]
        return (f"channels={channels}, reduced_channels={reduced_channels}, "
                f"activation={self.activation!r}, gate={self.gate!r}, fused=True")


# The state_dict keys are the stock module's own: 'stock.' is dropped on save and put back on load.
def _drop_stock_prefix(module, state_dict, prefix, local_metadata) -> None:
    inner = prefix + "stock."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)
    # The per-module version metadata is keyed by module path: 'se.stock' becomes 'se', 'se.stock.fc' 'se.fc'.
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if (k + ".").startswith(inner)]:
            metadata[(prefix + key[len(inner):]).rstrip(".")] = metadata.pop(key)


def _add_stock_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                      error_msgs) -> None:
    inner = prefix + "stock."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)
