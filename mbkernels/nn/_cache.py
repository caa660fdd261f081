"""What the fused modules share: weights folded once into buffers, kept current, and when to use the fused kernel."""
from typing import Optional

import torch
from torch import nn


def _refresh_after_load(module: "FusedModule", incompatible_keys) -> None:
    module.refresh()


class FusedModule(nn.Module):
    """Base of the fused modules: the stock layers run when training or when autograd needs a graph, the fused op
    otherwise, on weights folded once from the stock layers.

    The folded weights are non-persistent float32 buffers (not in the state_dict; moved by .to(), kept float32 by
    .half()), computed when the module is built: traced, compiled and exported graphs read them as attributes and
    hold no folding arithmetic. They are refreshed in place (so compiled graphs and CUDA graphs see new values)
    after load_state_dict, in eager calls when a source tensor was edited in place or replaced (a version check),
    and by `refresh()`, which edits through `.data` (invisible to version counters) need before a compiled call.

    Subclasses give `_fold_sources()` (the tensors folded from), `_fold_settings()` (plain values folded in, e.g.
    BatchNorm's eps) and `_fold()` (buffer name -> float32 tensor or None), and call `refresh()` once built."""

    def __init__(self):
        super().__init__()
        self._folded_from = None  # the sources' (storage, version) and the settings when last folded
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _fold_sources(self) -> list:
        raise NotImplementedError

    def _fold_settings(self) -> tuple:
        return ()

    def _fold(self) -> dict:
        raise NotImplementedError

    def _sources_key(self) -> Optional[tuple]:
        try:
            return tuple((t.data_ptr(), t._version) for t in self._fold_sources()) + self._fold_settings()
        except RuntimeError:  # inference tensors carry no version counter
            return None

    @torch.no_grad()
    def refresh(self) -> None:
        """Refold the weights from the stock layers' current values (needed after edits through `.data`)."""
        for name, value in self._fold().items():
            buffer = self._buffers.get(name)
            if (value is not None and buffer is not None and buffer.shape == value.shape
                    and buffer.dtype == value.dtype and buffer.device == value.device):
                buffer.copy_(value)  # in place: compiled graphs and captured CUDA graphs read this memory
            else:  # a copy: a fold may return a source itself (an SE's float32 weight), which must not alias it
                copy = None if value is None else value.clone(memory_format=torch.preserve_format)
                self.register_buffer(name, copy, persistent=False)
        self._folded_from = self._sources_key()

    def refresh_if_stale(self) -> None:
        """In eager calls: refold when a source tensor changed since the last fold. Traced, compiled and exported
        graphs read the buffers as they are (load_state_dict and refresh() keep them current)."""
        if torch.compiler.is_compiling():
            return
        key = self._sources_key()
        if key is None or key != self._folded_from:  # no version counter: nothing tells, so refold
            self.refresh()

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self.refresh()  # .half() converted the buffers too, and the folded weights stay float32
        return module

    def uses_fused_kernel(self, x: torch.Tensor) -> bool:
        if self.training:
            return False
        if x.dim() != 4 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return False  # what the stock layers take beyond the op (float64, unbatched 3-D input) they still get
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return True
