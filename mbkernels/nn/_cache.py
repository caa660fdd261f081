"""What the fused modules share: weights folded once into buffers, kept current, when to use the fused kernel, and
the op call itself, planned once per input signature."""
import os
from typing import Optional

import torch
from torch import nn

from .. import dispatch, ops

_MAX_PLANS = 64  # input signatures remembered per module (a server sees a few batch sizes; more is a leak)


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

    Subclasses give `_fold_modules()` (the modules folded from), `_fold_settings()` (plain values folded in, e.g.
    BatchNorm's eps) and `_fold()` (buffer name -> float32 tensor or None), and call `refresh()` once built."""

    def __init__(self):
        super().__init__()
        self._folded_from = None  # the sources' (storage, version) and the settings when last folded
        self._plans = {}  # input signature -> ops.prepare's callable (see run_op)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _fold_modules(self) -> tuple:
        """The modules whose parameters and buffers are folded (listed once per refresh, read on every eager call)."""
        raise NotImplementedError

    def _fold_settings(self) -> tuple:
        return ()

    def _fold(self) -> dict:
        raise NotImplementedError

    def _sources_key(self) -> Optional[tuple]:
        try:
            return tuple((t.data_ptr(), t._version) for m in self._source_modules
                         for table in (m._parameters, m._buffers) for t in table.values()
                         if t is not None) + self._fold_settings()
        except RuntimeError:  # inference tensors carry no version counter
            return None

    @torch.no_grad()
    def refresh(self) -> None:
        """Refold the weights from the stock layers' current values (needed after edits through `.data`)."""
        self._source_modules = tuple(m for m in self._fold_modules() if m is not None)
        for name, value in self._fold().items():
            buffer = self._buffers.get(name)
            if (value is not None and buffer is not None and buffer.shape == value.shape
                    and buffer.dtype == value.dtype and buffer.device == value.device
                    and buffer.stride() == value.stride()):
                buffer.copy_(value)  # in place: compiled graphs and captured CUDA graphs read this memory
            else:  # a copy: a fold may return a source itself (an SE's float32 weight), which must not alias it
                copy = None if value is None else value.clone(memory_format=torch.preserve_format)
                self.register_buffer(name, copy, persistent=False)
        self._folded_from = self._sources_key()
        self._plans = {}  # they hold the buffers they were made with

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

    def __getstate__(self):
        # Plans hold this module's buffers: a copy (deepcopy, pickle) makes its own from its own buffers.
        return {**self.__dict__, "_plans": {}}

    def run_op(self, op: str, *values) -> torch.Tensor:
        """torch.ops.mbkernels.<op>(*values) (x first, the backend name last). A plain eager call (ops.plain_eager_call)
        runs the plan made for x's signature by ops.prepare, kept until the next refresh: the checks, normalisation
        and backend choice are made once, and a call costs a lookup and the kernel, which matters at batch 1. Any
        other call (traced, compiled, exported) goes through the registered op."""
        x = values[0]
        if not ops.plain_eager_call(x):  # the other tensors are this module's buffers: plain, no autograd
            return getattr(torch.ops.mbkernels, op)(*values)
        key = (x.shape, x.stride(), x.dtype, x.device, os.environ.get(dispatch.ENV_VAR))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = ops.prepare(op, *values)
        return plan(x)

    def uses_fused_kernel(self, x: torch.Tensor) -> bool:
        if self.training:
            return False
        if x.dim() != 4 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return False  # what the stock layers take beyond the op (float64, unbatched 3-D input) they still get
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return True
