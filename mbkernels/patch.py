"""mbkernels.patch(model): swap stock depthwise conv -> BatchNorm -> activation runs and squeeze-excite modules
for the fused modules of mbkernels.nn, in place; unpatch puts the stock modules back; patch_report says what
was (or would be) fused and what was left alone, and why.

Matching is by structure, never by model names:
  * a depthwise nn.Conv2d followed, in its parent, by an nn.BatchNorm2d: in a plain nn.Sequential
    (torchvision's Conv2dNormActivation, hand-written blocks) the module after the BN is taken too when it is an
    activation with a fused kernel; a BN subclass that carries its activation (timm's BatchNormAct2d inside the
    EfficientNet / MobileNet blocks) brings it along;
  * a module whose only weights are two Linear / 1x1-conv layers C -> R -> C (R < C) is offered to
    mbkernels.nn.SqueezeExcite.from_module.
Every swap is checked numerically before it is made: the stock modules in float64 against the fused ones in
float32 with the reference backend, on a random probe, with random BatchNorm statistics; a mismatch is refused
and reported. In a parent other than a plain Sequential the whole parent runs, so a forward that does not apply
the BN right after the conv is caught. All swaps are made at the end, all or none.
"""
import copy
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from . import activations
from .nn.dwconv import DWConvBNAct, FusedInto, carried_activation, check_depthwise, check_norm
from .nn.squeeze_excite import SqueezeExcite

# Largest relative error (to the probe output's largest value) of float32 fused vs float64 stock: float32
# rounding stays near 1e-6; a wrong activation, padding or fold is off by far more.
VERIFY_TOLERANCE = 1e-4
_RESTORE = "_mbkernels_stock"  # on each fused module: ((slot name in the parent, stock module), ...)


# ---------------------------------------------------------------------------------------------- report
@dataclass
class PatchEntry:
    path: str  # the module's path in the model ("features.3.block.1.0")
    kind: str  # "dwconv_bn_act" or "squeeze_excite"
    shape: str  # "C=72 k=5x5 s=2" / "C=72 R=24"
    activation: str  # "hardswish" / "relu -> hardsigmoid"; "" when unknown
    reason: str = ""  # why it was left alone (skipped entries)


@dataclass
class PatchReport:
    """fused: fused modules in the model; fusable: matches not swapped yet (patch_report of a stock model);
    skipped: what looked close but was left alone, with the reason."""
    fused: list = field(default_factory=list)
    fusable: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def count(self, kind: str, status: str = "fused") -> int:
        return sum(entry.kind == kind for entry in getattr(self, status))

    def summary(self) -> str:
        def counts(status):
            return ", ".join(f"{self.count(kind, status)} {label}" for kind, label in KINDS.items())
        text = f"fused: {counts('fused')}"
        if self.fusable:
            text += f"; fusable (not patched yet): {counts('fusable')}"
        return text + f"; left alone: {len(self.skipped)}"

    def __str__(self) -> str:
        lines = [f"mbkernels patch report -- {self.summary()}"]
        if not (self.fused or self.fusable or self.skipped):
            lines.append("  nothing to fuse: no depthwise conv + BatchNorm and no squeeze-excite found")
        for title, entries in (("fused", self.fused), ("fusable, not patched yet", self.fusable)):
            if entries:
                lines.append(f"{title}:")
                lines += _table([("module", "kind", "shape", "activation")]
                                + [(e.path, KINDS[e.kind], e.shape, e.activation) for e in entries])
        if self.skipped:
            lines.append("left alone:")
            lines += _table([("module", "kind", "shape", "why")]
                            + [(e.path, KINDS[e.kind], e.shape, e.reason) for e in self.skipped])
        return "\n".join(lines)


def _table(rows) -> list:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join(str(v).ljust(w) for v, w in zip(row, widths)) + "  " + str(row[-1]) for row in rows]


def _conv_shape(conv: nn.Conv2d) -> str:
    text = f"C={conv.in_channels} k={conv.kernel_size[0]}x{conv.kernel_size[1]} s={conv.stride[0]}"
    if tuple(conv.dilation) != (1, 1):
        text += f" d={conv.dilation[0]}"
    return text


def _se_layers(module: nn.Module):
    """The two layers of an SE-like module ((in, out) of each), or None: its only weight-holding submodules are
    two Linear / 1x1 Conv2d layers C -> R -> C with R < C."""
    leaves = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
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


def _se_shape(module: nn.Module) -> str:
    shapes = _se_layers(module)
    return f"C={shapes[0][0]} R={shapes[0][1]}" if shapes else ""


def _se_activation(fused: nn.Module) -> str:
    act, gate = getattr(fused, "activation", None), getattr(fused, "gate", None)
    return f"{act} -> {gate}" if act and gate else ""


# ------------------------------------------------------------------------------------------ verification
@torch.no_grad()
def randomize_batchnorm(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Random running statistics and affine parameters for every BatchNorm in `model`, in place.

    Freshly initialised models in eval mode compute near-zero outputs that hide errors; tests, the probe checks
    and the main command use this instead."""
    def fill(t: torch.Tensor, sample: Callable) -> None:
        t.copy_(sample(torch.empty(t.shape, dtype=torch.float64)))

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is not None:
                fill(m.running_mean, lambda t: t.normal_(0.0, 0.5, generator=generator))
                fill(m.running_var, lambda t: t.uniform_(0.5, 2.0, generator=generator))
            if m.weight is not None:
                fill(m.weight, lambda t: t.uniform_(0.5, 1.5, generator=generator))
            if m.bias is not None:
                fill(m.bias, lambda t: t.normal_(0.0, 0.5, generator=generator))
    return model


def _probe_copy(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """A CPU eval-mode copy of module, stock (any fused module in it put back), with random BN statistics."""
    clone = unpatch(copy.deepcopy(module)).cpu().eval()
    return randomize_batchnorm(clone, generator)


@torch.no_grad()
def _compare(stock64: nn.Module, fused32: nn.Module, probe: torch.Tensor) -> Optional[str]:
    """None when the float32 fused module matches the float64 stock one on probe, else what differs."""
    want = stock64.double().eval()(probe)
    got = fused32.float().eval()(probe.float())
    if got.shape != want.shape:
        return f"fused output shape {tuple(got.shape)} differs from stock {tuple(want.shape)} on a probe"
    scale = want.abs().max().item()
    error = (got.double() - want).abs().max().item() / max(scale, 1e-30)
    if not error <= VERIFY_TOLERANCE:  # also catches NaN
        return f"fused output differs from stock on a probe (max relative error {error:.2e})"
    return None


def _checked(run: Callable) -> Optional[str]:
    try:
        return run()
    except Exception as error:  # anything that stops the check means "not proven equal": refuse the swap
        return f"could not be checked on a probe: {type(error).__name__}: {error}"


def _probe(channels: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    # One small odd-shaped image: float64 depthwise convolutions are slow on CPUs.
    return torch.randn(1, channels, height, width, dtype=torch.float64, generator=generator)


# ------------------------------------------------------------------------------------------ fusion kinds
class Skip(Exception):
    """A candidate that a fusion kind leaves alone; the message is the reason the report shows."""


@dataclass
class Candidate:
    """One match a fusion kind found among a parent's children, not yet checked."""
    path: str  # the model path of the module that the fused module replaces (its first slot)
    shape: str
    # Builds the swap: [(slot name in the parent, new module, stock module)], the fused module first; raises Skip.
    build: Callable[[], list]
    # Compares, on a probe, the stock modules with a reference-backend copy of the fused ones: None or a difference.
    check: Callable[[], Optional[str]]


class FusionKind:
    """One kind of fusion behind the planner's protocol: find candidates among a parent's children, build and
    check each, describe fused modules for the report. Kinds run in FUSION_KINDS order; a child a kind takes is
    not offered to the later ones, and a planned swap's modules are not visited further."""
    kind = ""  # the report's key, e.g. "dwconv_bn_act"
    label = ""  # the report's words, e.g. "dwconv+bn+act"
    fused_type: type = type(None)  # the fused module class this kind puts in

    def __init__(self, planner: "_Planner"):
        self.planner = planner

    def candidates(self, parent: nn.Module, path: str, children: list, taken: set):
        """Yield Candidates (or raise Skip per child through `skipped`) among parent's (name, child) children."""
        raise NotImplementedError

    def describe(self, fused: nn.Module) -> tuple[str, str]:
        """(shape, activation) of a fused module of this kind, for the report."""
        raise NotImplementedError


class DWConvKind(FusionKind):
    """A depthwise nn.Conv2d followed, in its parent, by a BatchNorm2d (and, in a plain Sequential, by an
    activation with a kernel; a BatchNormAct2d brings its own)."""
    kind, label, fused_type = "dwconv_bn_act", "dwconv+bn+act", DWConvBNAct

    def candidates(self, parent, path, children, taken):
        plain_sequential = isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward
        for i, (name, conv) in enumerate(children):
            if not (isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels > 1) or name in taken:
                continue
            yield Candidate(f"{path}{name}", _conv_shape(conv),
                            functools.partial(self.build, parent, children, i, plain_sequential),
                            functools.partial(self.check, parent, children, i, plain_sequential))

    def run(self, children, i, plain_sequential):
        """((bn name, bn), (act name, act) or None) for the depthwise conv children[i]; Skip with the reason."""
        conv = children[i][1]
        try:
            check_depthwise(conv)
        except ValueError as error:
            raise Skip(str(error)) from None
        if i + 1 == len(children):
            raise Skip("not followed by a BatchNorm2d (it is the last module of its parent)")
        bn_name, bn = children[i + 1]
        if not isinstance(bn, nn.BatchNorm2d):
            raise Skip(f"not followed by a BatchNorm2d (the next module is {type(bn).__name__})")
        try:
            check_norm(bn)
        except ValueError as error:
            raise Skip(str(error)) from None
        if not plain_sequential or carried_activation(bn) is not None or i + 2 == len(children):
            return (bn_name, bn), None
        act_name, act = children[i + 2]
        if activations.identify_activation(act) is not None:
            return (bn_name, bn), (act_name, act)
        if _is_activation_module(act):
            raise Skip(f"activation {type(act).__name__} after the BatchNorm has no fused kernel; supported: "
                       f"{', '.join(activations.ACTIVATIONS)}")
        return (bn_name, bn), None  # something else follows: fuse conv + BN alone

    def build(self, parent, children, i, plain_sequential):
        name, conv = children[i]
        (bn_name, bn), act_item = self.run(children, i, plain_sequential)
        slots = {"conv": name, "bn": bn_name}
        act = None
        if act_item is not None:
            slots["act"], act = act_item
        try:
            fused = DWConvBNAct(conv, bn, act, backend=self.planner.backend, stock_slots=slots)
        except ValueError as error:
            raise Skip(str(error)) from None
        items = [(name, fused, conv), (bn_name, FusedInto(name, bn), bn)]
        if act_item is not None:
            items.append((act_item[0], FusedInto(name, act), act))
        return items

    def check(self, parent, children, i, plain_sequential):
        name, conv = children[i]
        (bn_name, bn), act_item = self.run(children, i, plain_sequential)
        generator = self.planner.generator
        if plain_sequential:
            act = [act_item[1]] if act_item is not None else []
            stock = _probe_copy(nn.Sequential(conv, bn, *act), generator)
            reference = DWConvBNAct(*copy.deepcopy(list(stock)), backend="reference")
            reach = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            return _compare(stock, reference, _probe(conv.in_channels, reach[0] + 3, reach[1] + 4, generator))
        # Any other parent runs whole, so a forward that does not apply the BN right after the conv is caught.
        stock = _probe_copy(parent, generator)
        swapped = copy.deepcopy(stock)
        conv_copy, bn_copy = getattr(swapped, name), getattr(swapped, bn_name)
        setattr(swapped, name, DWConvBNAct(conv_copy, bn_copy, backend="reference"))
        setattr(swapped, bn_name, nn.Identity())
        first_conv = next(m for m in stock.modules() if isinstance(m, nn.Conv2d))
        size = 4 + max(d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
        return _compare(stock, swapped, _probe(first_conv.in_channels, size, size + 1, generator))

    def describe(self, fused):
        return _conv_shape(fused.conv), fused.activation


class SqueezeExciteKind(FusionKind):
    """A module whose only weights are two Linear / 1x1-conv layers C -> R -> C (R < C), offered to
    mbkernels.nn.SqueezeExcite.from_module."""
    kind, label, fused_type = "squeeze_excite", "squeeze-excite", SqueezeExcite

    def candidates(self, parent, path, children, taken):
        for name, module in children:
            if name in taken or _se_layers(module) is None:
                continue
            yield Candidate(f"{path}{name}", _se_shape(module), functools.partial(self.build, name, module),
                            functools.partial(self.check, module))

    def build(self, name, module):
        try:
            return [(name, SqueezeExcite.from_module(module, backend=self.planner.backend), module)]
        except ValueError as error:
            raise Skip(str(error)) from None

    def check(self, module):
        generator = self.planner.generator
        stock = _probe_copy(module, generator)
        reference = SqueezeExcite.from_module(copy.deepcopy(stock), backend="reference")
        return _compare(stock, reference, _probe(_se_layers(module)[0][0], 5, 7, generator))

    def describe(self, fused):
        return _se_shape(fused), _se_activation(fused)


FUSION_KINDS = (DWConvKind, SqueezeExciteKind)
KINDS = {kind.kind: kind.label for kind in FUSION_KINDS}


# ------------------------------------------------------------------------------------------------ planning
@dataclass
class _Swap:
    parent: nn.Module
    assignments: list  # [(slot name, new module)], applied in order
    entry: PatchEntry


class _Planner:
    def __init__(self, backend: Optional[str], kinds: tuple):
        self.backend = backend
        self.kinds = [kind(self) for kind in kinds]
        self.report = PatchReport()
        self.swaps = []
        self.generator = torch.Generator().manual_seed(0)

    def visit(self, parent: nn.Module, path: str) -> None:
        children = list(parent.named_children())
        taken = {name for name, child in children if isinstance(child, FusedInto) or self.record_fused(child, path + name)}
        skipped = {}  # child name -> the skip entries of candidates that child started
        for kind in self.kinds:
            for candidate in list(kind.candidates(parent, path, children, taken)):
                try:
                    taken.update(self.plan(parent, kind, candidate))
                except Skip as skip:
                    entry = PatchEntry(candidate.path, kind.kind, candidate.shape, "", str(skip))
                    self.report.skipped.append(entry)
                    skipped.setdefault(candidate.path[len(path):].partition(".")[0], []).append(entry)
        for name, child in children:
            if name in taken:
                continue
            fused_before = len(self.report.fused) + len(self.swaps)
            self.visit(child, f"{path}{name}.")
            if len(self.report.fused) + len(self.swaps) > fused_before:
                # A wrapper around what was fused inside it (an SE inside a module with the SE's layers): the
                # match is inside, so the wrapper's own refusal is no news.
                for entry in skipped.get(name, []):
                    self.report.skipped.remove(entry)

    def record_fused(self, module: nn.Module, path: str) -> bool:
        for kind in self.kinds:
            if isinstance(module, kind.fused_type):
                self.report.fused.append(PatchEntry(path, kind.kind, *kind.describe(module)))
                return True
        return False

    def plan(self, parent: nn.Module, kind: FusionKind, candidate: Candidate) -> list:
        """Build and check one candidate and plan its swap; the slots it takes. Skip when it cannot be fused."""
        items = candidate.build()
        failure = _checked(candidate.check)
        if failure is not None:
            raise Skip(failure)
        fused = items[0][1]
        object.__setattr__(fused, _RESTORE, tuple((slot, stock) for slot, _, stock in items))
        for _, new, stock in items:
            new.training = stock.training  # new modules start in training mode; take the stock one's
        shape, activation = kind.describe(fused)
        entry = PatchEntry(candidate.path, kind.kind, shape, activation)
        self.swaps.append(_Swap(parent, [(slot, new) for slot, new, _ in items], entry))
        return [slot for slot, _, _ in items]


def _is_activation_module(module: nn.Module) -> bool:
    """A parameter-free module from an activations module (torch.nn's, timm's): an activation we may lack."""
    origin = type(module).__module__
    stateless = next(module.parameters(), None) is None and next(module.children(), None) is None
    return stateless and ("activation" in origin) and not isinstance(module, nn.Identity)


def _refuse_meta_tensors(model: nn.Module) -> None:
    """Weights on the meta device cannot be folded or checked: say so rather than fuse nothing quietly."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    meta = [name for name, tensor in tensors if tensor.device.type == "meta"]
    if meta:
        raise ValueError(
            f"cannot patch: {len(meta)} parameters/buffers are on the meta device (first: '{meta[0]}'); load the "
            f"weights first (model.to_empty(device=...), then load_state_dict)"
        )


def _plan(model: nn.Module, backend: Optional[str], dwconv: bool, se: bool) -> _Planner:
    _refuse_meta_tensors(model)
    wanted = {"dwconv_bn_act": dwconv, "squeeze_excite": se}
    planner = _Planner(backend, tuple(kind for kind in FUSION_KINDS if wanted.get(kind.kind, True)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the probes are tiny: thread start-up would cost more than it saves
    try:
        planner.visit(model, "")
    finally:
        torch.set_num_threads(threads)
    return planner


# ----------------------------------------------------------------------------------------------- public
def patch(model: nn.Module, backend: Optional[str] = None, dwconv: bool = True, se: bool = True,
          verbose: bool = False) -> nn.Module:
    """Swap, in place, every depthwise conv -> BatchNorm -> activation run for mbkernels.nn.DWConvBNAct and every
    squeeze-excite for mbkernels.nn.SqueezeExcite; return the model.

    backend: the backend the fused modules ask for (None: the best available at each call). Each swap is checked
    on a probe first and refused when it does not match; state_dict keys and values stay those of the stock model.
    Patching a patched model changes nothing. If a swap fails half-way, the model is left as it was.
    verbose: print patch_report's table.
    """
    planner = _plan(model, backend, dwconv, se)
    done = []  # (parent, slot, previous module), to undo
    try:
        for swap in planner.swaps:
            for slot, module in swap.assignments:
                done.append((swap.parent, slot, getattr(swap.parent, slot)))
                setattr(swap.parent, slot, module)
    except BaseException:
        for parent, slot, previous in reversed(done):
            setattr(parent, slot, previous)
        raise
    report = planner.report
    report.fused += [swap.entry for swap in planner.swaps]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.fused.sort(key=lambda entry: order.get(entry.path, -1))
    if verbose:
        print(report)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put back, in place, the stock modules (the very objects) that patch swapped out; return the model."""
    for parent in list(model.modules()):
        for _, child in list(parent.named_children()):
            for slot, stock in getattr(child, _RESTORE, ()):
                stock.train(child.training)
                setattr(parent, slot, stock)
    return model


def patch_report(model: nn.Module, backend: Optional[str] = None, dwconv: bool = True,
                 se: bool = True) -> PatchReport:
    """What is fused in model, what patch would fuse (fusable), and what was left alone and why. Changes nothing."""
    planner = _plan(model, backend, dwconv, se)
    planner.report.fusable = [swap.entry for swap in planner.swaps]
    return planner.report
