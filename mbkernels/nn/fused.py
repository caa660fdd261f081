"""What the fused modules share: weights folded once into buffers, kept current, when to use the fused kernel, the
op call itself, planned once per input signature, and the eager window in which a patched model's forward runs
those plans with nothing else per call."""
import contextlib
import os
from functools import partial
from itertools import chain
from operator import attrgetter, is_not
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .. import dispatch, ops

_MAX_PLANS = 64  # input signatures remembered per module (a server sees a few batch sizes; more is a leak)
# The staleness check (once per forward of a patched model, for each fused module; see EagerWindow), iterated in C.
_version_of, _data_ptr_of, _present = attrgetter("_version"), torch.Tensor.data_ptr, partial(is_not, None)


def _signature(x: torch.Tensor, backend_variable: Optional[str]) -> tuple:
    """What a plan is made for: x's shape, layout, dtype and device, and the MBKERNELS_BACKEND in force."""
    return x.shape, x.stride(), x.dtype, x.device, backend_variable


STOCK = "stock"  # a measured choice (FusedModule.tuned): the stock modules are the fastest for that input


def tuning_key(x: torch.Tensor) -> tuple:
    """What a measured choice is made for: x's shape, strides, dtype and device (plain ints: a traced call with
    symbolic sizes specialises to the ones it was measured at)."""
    return tuple(map(int, x.shape)), tuple(map(int, x.stride())), x.dtype, x.device


class EagerWindow:
    """One check per forward of a patched model instead of one per fused module call.

    At batch 1 a fused module's own checks (grad mode, tracing, the sources' versions, the backend variable) cost
    as much as its conv: each conv evicts their code and data, so a dozen attribute reads take microseconds. The
    window is a forward pre-hook and an always-called forward hook on the model `mbkernels.patch` was given: the
    pre-hook makes the checks for the whole forward (a plain eager call without autograd: not compiling,
    tracing or under a dispatch mode, grad disabled; every eval-mode fused module refolded if a source changed)
    and opens the window, and while it is open a fused module given a plain tensor runs the plan it made for that
    signature, if any, at once (see FusedModule.forward). The forward hook closes it, also when forward raises.
    What the window does not see: a source tensor edited by the model's own forward, or by another thread during it.
    """

    def __init__(self, modules: Iterable["FusedModule"] = ()):
        self.modules = tuple(modules)
        self.open = False
        self.backend_variable = None
        self.handles = ()

    @classmethod
    def attach(cls, model: nn.Module) -> None:
        """Give `model` a window over the fused modules in it (replacing the one it had): mbkernels.patch does."""
        cls.detach(model)
        window = cls(m for m in model.modules() if isinstance(m, FusedModule))
        if not window.modules:
            return
        for module in window.modules:
            module._window = window
        window.handles = (model.register_forward_pre_hook(window.enter),
                          model.register_forward_hook(window.leave, always_call=True))

    @staticmethod
    def detach(model: nn.Module) -> None:
        """Remove the window `model` has, if any (the fused modules then make their checks on every call)."""
        for hook in list(model._forward_pre_hooks.values()):
            window = getattr(hook, "__self__", None)
            if isinstance(window, EagerWindow):
                for handle in window.handles:
                    handle.remove()
                for module in window.modules:
                    if module._window is window:
                        del module._window
                window.handles = ()

    def enter(self, model: nn.Module, args) -> None:
        if not ops.plain_eager_state() or torch.is_grad_enabled():
            return
        self.backend_variable = os.environ.get(dispatch.ENV_VAR)
        for module in self.modules:
            if not module.training:
                module.refold_if_changed()
        self.open = True

    def leave(self, model: nn.Module, args, output) -> None:
        self.open = False

    @staticmethod
    @contextlib.contextmanager
    def opened_around(module: nn.Module):
        """The windows of the fused modules inside `module` open for the duration, as in the model's forward (the
        caller made the window's checks: eval mode, no autograd): their plans run without per-call checks."""
        windows = {m._window for m in module.modules() if isinstance(m, FusedModule)} - {_CLOSED}
        for window in windows:
            window.backend_variable = os.environ.get(dispatch.ENV_VAR)
            window.open = True
        try:
            yield
        finally:
            for window in windows:
                window.open = False


_CLOSED = EagerWindow()  # the window of a fused module no patched model's forward checks: never open


# What a conv's and a BatchNorm's stand-ins write through to them: what is folded (the refold rules see a change).
CONV_SETTINGS = ("stride", "padding", "dilation", "weight", "bias")
NORM_SETTINGS = ("eps", "weight", "bias", "running_mean", "running_var")


class StandIn:
    """A module in the slot of a stock one answers the stock module's public attributes as that module would.

    Code around a swapped module may read what it replaced (transformers' MobileNets compute TensorFlow padding
    from `self.convolution.kernel_size` and `.stride`; others read `.out_channels`, `.weight`, a BatchNorm's
    `.num_features`): a public name this module does not have is read from the module named by `stands_in_for`,
    and a write of one of `writes_through` (the settings and tensors that are folded) goes to it, where the refold
    rules see it (a changed tensor or setting is refolded before the next fused call)."""
    stands_in_for = ""  # the attribute holding the stock module this one stands in for
    writes_through = ()  # the names whose writes go to that module

    def _stock_stood_for(self) -> Optional[nn.Module]:
        modules = self.__dict__.get("_modules", {})
        name = type(self).stands_in_for
        stock = modules.get(name, self.__dict__.get(name))
        return stock if isinstance(stock, nn.Module) else None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            stock = None if name.startswith("_") else self._stock_stood_for()
            if stock is None or not hasattr(stock, name):
                raise
            return getattr(stock, name)

    def __setattr__(self, name: str, value) -> None:
        stock = self._stock_stood_for() if name in type(self).writes_through else None
        if stock is not None and hasattr(stock, name):
            setattr(stock, name, value)
        else:
            super().__setattr__(name, value)



def _refresh_after_load(module: "FusedModule", incompatible_keys) -> None:
    module.refresh()


class FusedModule(StandIn, nn.Module):
    """Base of the fused modules: the stock layers run when training or when autograd needs a graph, the fused op
    otherwise, on weights folded once from the stock layers.

    The folded weights are non-persistent float32 buffers (not in the state_dict; moved by .to(), kept float32 by
    .half()), computed when the module is built: traced, compiled and exported graphs read them as attributes and
    hold no folding arithmetic. They are refreshed in place (so compiled graphs and CUDA graphs see new values)
    after load_state_dict, in eager calls when a source tensor was edited in place or replaced (a version check),
    and by `refresh()`, which edits through `.data` (invisible to version counters) need before a compiled call.

    Subclasses give `_fold_modules()` (the modules folded from), `_fold_settings()` (plain values folded in, e.g.
    BatchNorm's eps) and `_fold()` (buffer name -> float32 tensor or None), and call `refresh()` once built."""

    _window = _CLOSED  # see EagerWindow

    def __init__(self):
        super().__init__()
        self._folded_from = None  # the sources' (storage, version) and the settings when last folded
        self._plans = {}  # input signature -> ops.prepare's callable (see run_op)
        # A tuned patch's measurements (mbkernels.planner.tuning): tuning_key(x) -> what runs for such an x (STOCK,
        # else the backend of the op; ConvBNAct: its folded conv), and -> {variant: median ms} for the report.
        self.tuned, self.timings = {}, {}
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _fold_modules(self) -> tuple:
        """The modules whose parameters and buffers are folded, as they are now (asked on every staleness check)."""
        raise NotImplementedError

    def _fold_settings(self) -> tuple:
        return ()

    def _fold(self) -> dict:
        raise NotImplementedError

    def _sources_key(self) -> Optional[tuple]:
        """The source modules (one replaced by another is seen), their tensors' storages and versions (an in-place
        edit bumps a version; a replaced tensor or `.data` swap moves the storage) and the fold settings."""
        modules = tuple(filter(_present, self._fold_modules()))
        tables = chain.from_iterable((m._parameters.values(), m._buffers.values()) for m in modules)
        tensors = tuple(filter(_present, chain.from_iterable(tables)))
        try:
            return (tuple(map(id, modules)), tuple(map(_data_ptr_of, tensors)), tuple(map(_version_of, tensors)),
                    self._fold_settings())
        except RuntimeError:  # inference tensors carry no version counter
            return None

    @torch.no_grad()
    def refresh(self) -> None:
        """Refold the weights from the stock layers' current values (needed after edits through `.data`)."""
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
        if not torch.compiler.is_compiling():
            self.refold_if_changed()

    def refold_if_changed(self) -> None:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = self._window
        if window.open and type(x) is torch.Tensor and not self.training and not torch.is_grad_enabled():
            plan = self._plans.get(_signature(x, window.backend_variable))
            if plan is not None:  # the window made every other check for this forward
                return plan(x)
        return self.checked_forward(x)

    def checked_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward with every check made: the stock modules (training, autograd, what the op does not take, or
        measured faster) or the fused computation (which makes the plans)."""
        if not self.uses_fused_kernel(x):
            return self.stock_forward(x)
        if self.tuned_choice(x) == STOCK:
            return self.run_stock(x)
        return self.run_fused(x)

    def run_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The fused op on x (the stock modules where it cannot take x: TensorFlow 'SAME' with no plan for it)."""
        call = self.op_call(x)
        if call is None:
            return self.stock_forward(x)
        return self.run_op(*call, self.backend_for(x))

    def op_call(self, x: torch.Tensor) -> Optional[tuple]:
        """(op name, its arguments for x, the backend aside), or None where the stock modules must run."""
        raise NotImplementedError

    def plan_for(self, x: torch.Tensor, make: Callable[[], Callable]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The plan (a callable of x alone) kept for x's signature until the next refresh, made by `make()` if none is."""
        key = _signature(x, os.environ.get(dispatch.ENV_VAR))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = make()
        return plan

    def exchange_choices(self, choices: tuple) -> tuple:
        """Run other measured choices from now on: choices is (tuned, plans), as this returns what it replaces, so
        that a caller comparing choice sets keeps each set's plans (made for its choices) across the switches."""
        previous = self.tuned, self._plans
        self.tuned, self._plans = choices
        return previous

    def keep_measured(self, key: tuple, choice: str, timings: dict) -> None:
        """What a tuned patch measured for inputs of tuning_key `key`: the choice runs from now on (the plans made
        before it go)."""
        self.tuned[key], self.timings[key] = choice, timings
        self._plans = {}

    def tuned_choice(self, x: torch.Tensor) -> Optional[str]:
        """What a tuned patch measured fastest for an input like x; None when it measured none such."""
        return self.tuned.get(tuning_key(x)) if self.tuned else None

    def backend_for(self, x: torch.Tensor) -> str:
        """The backend the op is asked for: the one this module was given, else the measured one for x (unless
        MBKERNELS_BACKEND names one), else "" (dispatch picks)."""
        if self.backend:
            return self.backend
        choice = self.tuned_choice(x)
        if choice is not None and choice != STOCK and not os.environ.get(dispatch.ENV_VAR):
            return choice
        return ""

    def run_stock(self, x: torch.Tensor) -> torch.Tensor:
        """The stock modules on x, where they were measured fastest (a plan like the fused op's, in plain eager)."""
        if ops.plain_eager_call(x):
            return self.plan_for(x, lambda: self.stock_forward)(x)
        return self.stock_forward(x)

    def stock_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What the stock modules compute on x."""
        raise NotImplementedError

    def run_op(self, op: str, *values) -> torch.Tensor:
        """torch.ops.mbkernels.<op>(*values) (x first, the backend name last). A plain eager call (ops.plain_eager_call)
        runs the plan made for x's signature by ops.prepare: the checks, normalisation and backend choice are made
        once, and a call costs a lookup and the kernel, which matters at batch 1. Any other call (traced, compiled,
        exported) goes through the registered op."""
        x = values[0]
        if not ops.plain_eager_call(x):  # the other tensors are this module's buffers: plain, no autograd
            return getattr(torch.ops.mbkernels, op)(*values)
        return self.plan_for(x, lambda: ops.prepare(op, *values))(x)

    def uses_fused_kernel(self, x: torch.Tensor) -> bool:
        if self.training:
            return False
        if x.dim() != 4 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return False  # what the stock layers take beyond the op (float64, unbatched 3-D input) they still get
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return True


def use_stock_state_dict_keys(module: nn.Module) -> None:
    """State-dict keys of a fused module that holds its stock module as `stock` are the stock module's own:
    'stock.' is dropped on save and put back on load, so checkpoints load both ways."""
    module.register_state_dict_post_hook(_drop_stock_prefix)
    module.register_load_state_dict_pre_hook(_add_stock_prefix)


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
