"""A value derived from module tensors (folded weights), recomputed only when one of them changes."""
from typing import Callable, Sequence

import torch


class DerivedTensors:
    """Caches compute() and recomputes it when any source tensor is edited in place (load_state_dict,
    optimizer steps), replaced or moved. Owners call clear() from their _apply (.to(), .half(), .cuda())."""

    def __init__(self):
        self._key = None
        self._value = None

    def get(self, sources: Sequence[torch.Tensor], compute: Callable):
        if torch.compiler.is_compiling():
            return compute()  # traced into the graph; inductor constant-folds it when frozen
        try:
            key = tuple((t.data_ptr(), t._version) for t in sources)
        except RuntimeError:  # inference tensors carry no version counter: recompute every call
            return compute()
        if key != self._key:
            self._value = compute()
            self._key = key
        return self._value

    def clear(self) -> None:
        self._key = self._value = None
