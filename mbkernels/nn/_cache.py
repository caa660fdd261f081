"""What the fused modules share: cached derived weights, and when to use the fused kernel at all."""
from typing import Callable, Sequence

import torch
from torch import nn


class DerivedTensors:
    """Caches compute() and recomputes it when any source tensor is edited in place (load_state_dict,
    optimizer steps), replaced or moved. Owners call clear() from their _apply (.to(), .half(), .cuda())."""

    def __init__(self):
        self._key = None
        self._value = None

    def get(self, sources: Sequence[torch.Tensor], compute: Callable, settings: tuple = ()):
        """settings: plain values the result also depends on (BatchNorm's eps)."""
        if torch.compiler.is_compiling():
            return compute()  # traced into the graph; inductor constant-folds it when frozen
        try:
            key = tuple((t.data_ptr(), t._version) for t in sources) + tuple(settings)
        except RuntimeError:  # inference tensors carry no version counter: recompute every call
            return compute()
        if key != self._key:
            self._value = compute()
            self._key = key
        return self._value

    def clear(self) -> None:
        self._key = self._value = None


class FusedModule(nn.Module):
    """Base of the fused modules: the stock layers run when training or when autograd needs a graph, the fused op
    otherwise, with weights derived once (self.derived) and re-derived after .to() / .half() / .cuda()."""

    def __init__(self):
        super().__init__()
        self.derived = DerivedTensors()

    def _apply(self, fn, recurse=True):
        self.derived.clear()
        return super()._apply(fn, recurse)

    def uses_fused_kernel(self, x: torch.Tensor) -> bool:
        if self.training:
            return False
        if x.dim() != 4 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return False  # what the stock layers take beyond the op (float64, unbatched 3-D input) they still get
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return True
