"""SqueezeExcite: a stock squeeze-and-excite module run as one fused op in inference.

Recognised sources (mbkernels.match.se.find_se_parts): timm's SqueezeExcite (conv_reduce, act1,
conv_expand, gate) and SEModule (also with a BatchNorm between fc1 and its activation, as rexnet's: folded into
fc1) and EffectiveSEModule (one layer C -> C, as hgnet's EseModule: the op's expand layer is then the identity),
torchvision's SqueezeExcitation (avgpool, fc1, activation, fc2, scale_activation), and hand-written SE modules
whose layers are two nn.Linear or 1x1 nn.Conv2d with an activation and a gate module (also inside an
nn.Sequential). Since a hand-written forward can compute anything, a match is proven on a probe.
"""
import copy
from typing import Optional

import torch
from torch import nn

from ..backends import proof_backend
from .. import activations, ops
from ..match import probe_copy, probe_input, prove
from ..match.se import SEParts, find_se_parts
from .fused import FusedModule, use_stock_state_dict_keys


def se_expand_weights(expand: Optional[nn.Module], channels: int, dtype: torch.dtype, device, gate: str):
    """(w_expand [C, R], b_expand) in dtype; the identity for a one-layer SE. A gate of an affine map of its input
    (activations.parse_gate: "hardsigmoid:6,-3") has the map folded in: the op's gate is then the plain one."""
    _, scale, shift = activations.parse_gate(gate)
    if expand is None:
        weight, bias = torch.eye(channels, dtype=dtype, device=device), None
    else:
        weight = expand.weight.detach().flatten(1).to(dtype)
        bias = None if expand.bias is None else expand.bias.detach().to(dtype)
    if (scale, shift) != (1.0, 0.0):
        weight = weight * scale
        bias = torch.full(weight.shape[:1], shift, dtype=dtype, device=weight.device) if bias is None \
            else bias * scale + shift
    return weight.contiguous(), None if bias is None else bias.contiguous()


def se_reduce_weights(reduce: nn.Module, norm: Optional[nn.Module], dtype: torch.dtype):
    """(w_reduce [R, C], b_reduce) in dtype, the norm folded in (b_reduce None when there is neither bias nor norm)."""
    weight = reduce.weight.detach().flatten(1).to(dtype)
    bias = None if reduce.bias is None else reduce.bias.detach().to(dtype)
    if norm is None:
        return weight.contiguous(), bias
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device)
    return ops.fold_bn_into(weight, bias, norm)


class SqueezeExcite(FusedModule):
    """x * gate(expand(act(reduce(mean_hw(x))))) computed by `mbkernels.ops.squeeze_excite` in inference.

    Build it with `SqueezeExcite.from_module(se)`. The stock module stays inside as `stock` and runs unchanged in
    training mode or when autograd needs a graph; the state_dict has the stock module's keys, so checkpoints load
    both ways. The float32 weights are buffers made when the module is built and refreshed when a parameter
    changes (see FusedModule).
    """

    stands_in_for = "stock"  # code reading the stock SE's attributes reads them (StandIn)

    def __init__(self, stock: nn.Module, parts: SEParts, stock_writes_input: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        self.stock = stock
        self.reduce_path, self.expand_path, self.norm_path = parts.reduce, parts.expand, parts.norm
        self.activation, self.gate = parts.activation, parts.gate
        self.op_gate = activations.parse_gate(parts.gate)[0]  # the op's: an affine map before it is folded in
        self.stock_writes_input = stock_writes_input
        self.backend = backend
        self.training = stock.training  # swapped into a model in eval mode, it runs fused at once
        use_stock_state_dict_keys(self)
        self.refresh()

    @classmethod
    def from_module(cls, module: nn.Module, backend: Optional[str] = None) -> "SqueezeExcite":
        """Wrap a stock or hand-written SE module, proven on a probe; ValueError saying what did not match for
        anything else."""
        if not isinstance(module, nn.Module):
            raise ValueError(f"expected an nn.Module, got {type(module).__name__}")
        if isinstance(module, SqueezeExcite):
            raise ValueError("the module is already a fused SqueezeExcite")
        parts = find_se_parts(module)
        generator = torch.Generator().manual_seed(0)
        stock = probe_copy(module, generator)
        channels = stock.get_submodule(parts.reduce).weight.shape[1]
        probe = probe_input(channels, 5, 4, generator, batch=2) * 2
        try:
            proof = prove(stock, [("fused", lambda: cls(copy.deepcopy(stock), parts, backend=proof_backend()))],
                          probe)
        except Exception as error:  # whatever a hand-written forward raises: it is not an SE we can stand in for
            raise ValueError(f"{type(module).__name__} failed on a probe input of shape {tuple(probe.shape)}: "
                             f"{error}") from error
        if proof.failure is not None:
            raise ValueError(f"{type(module).__name__} has the layers of a squeeze-excite module ({parts.activation}, "
                             f"{parts.gate}) but does not compute one: {proof.failure}")
        return cls(module, parts, proof.stock_writes_input, backend)

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
        w_reduce, b_reduce = se_reduce_weights(reduce, self._norm(), torch.float32)
        w_expand, b_expand = se_expand_weights(expand, reduce.weight.shape[1], torch.float32, reduce.weight.device,
                                               self.gate)
        return {"folded_w_reduce": w_reduce, "folded_b_reduce": b_reduce,
                "folded_w_expand": w_expand, "folded_b_expand": b_expand}

    def fused_weights(self):
        """The float32 (w_reduce [R, C], b_reduce, w_expand [C, R], b_expand) the fused op gets."""
        self.refresh_if_stale()
        return self.folded_w_reduce, self.folded_b_reduce, self.folded_w_expand, self.folded_b_expand

    def stock_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stock module as it is, except that it may not scale the caller's x in place."""
        return self.stock(x.clone() if self.stock_writes_input else x)

    def op_call(self, x: torch.Tensor) -> tuple:
        """(op name, its arguments for x, the backend aside)."""
        return ("squeeze_excite", x, *self.fused_weights(), self.activation, self.op_gate)

    def extra_repr(self) -> str:
        reduced_channels, channels = self.reduce_layer.weight.shape[:2]
        return (f"channels={channels}, reduced_channels={reduced_channels}, "
                f"activation={self.activation!r}, gate={self.gate!r}, fused=True")
