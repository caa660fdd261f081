"""What a tuned patch times for one fused module: the stock modules, each backend that can run its op (ConvBNAct: its
folded conv), and what the speed depends on besides the input (the cache's key).
"""
import json

import torch
from torch import nn

from .. import backends, dispatch, ops
from .._contract import CONTRACTS
from ..nn.conv_bn_act import ConvBNAct
from ..nn.fused import STOCK, FusedModule

FOLDED = "folded"  # ConvBNAct's fused variant: PyTorch's conv on the folded weights


def feasible_backends(op: str, values: tuple) -> list[str]:
    """The backends dispatch would run op on these arguments with (the device rule as for an automatic choice)."""
    contract = CONTRACTS[op]
    args = contract.bundle(*values)
    contract.check(args)
    args = contract.normalise(args)
    return [backend.name for backend in backends.declared()
            if dispatch.why_not(backend, op, args, explicit=False) is None]


def variants_of(fused: FusedModule, x: torch.Tensor) -> dict:
    """Name -> callable of x: the stock modules, then each backend that can run the fused op (ConvBNAct: its
    folded conv)."""
    variants = {STOCK: fused.stock_forward}
    if isinstance(fused, ConvBNAct):
        folded = fused.folded_conv_for(x)
        if folded is not None:
            variants[FOLDED] = folded
        return variants
    call = fused.op_call(x)
    if call is None:  # TF 'SAME' for which the fused module runs stock anyway
        return variants
    op, values = call[0], call[1:]
    for name in feasible_backends(op, values):
        variants[name] = ops.prepare(op, *values, name)
    return variants


def describe(module: nn.Module) -> str:
    """What a candidate's speed depends on besides its input: its settings and the stock modules it stands for."""
    stock = sorted({type(m).__qualname__ for m in _stock_modules(module)})
    code = getattr(module.__dict__.get("stock_forward"), "graph", None)  # a rewrite's stock nodes
    ops_text = [str(node.target) for node in code.nodes] if code is not None else []
    return json.dumps([type(module).__qualname__, module.extra_repr(), stock, ops_text])


def _stock_modules(module: nn.Module) -> list:
    found = []
    for name in ("conv", "bn", "act", "stock"):
        part = module.__dict__.get(name) or module._modules.get(name)
        if isinstance(part, nn.Module):
            found += list(part.modules())
    return found
