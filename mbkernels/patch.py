"""mbkernels.patch(model): swap stock depthwise conv -> BatchNorm -> activation runs, squeeze-excite modules and
the other convs' BatchNorms for the fused modules of mbkernels.nn, in place; unpatch puts the stock modules back;
patch_report says what was (or would be) fused and what was left alone, and why.

Matching is by structure, never by model names:
  * a module holding one inverted-residual block (expand 1x1 -> BN -> act -> depthwise -> BN -> act -> [SE] ->
    project 1x1 -> BN [+ x]) is offered to mbkernels.nn.InvertedResidual.from_module, and fused whole where the
    cost model prefers it (BlockKind); otherwise its layers are fused by the kinds below;
  * a depthwise nn.Conv2d (or timm's Conv2dSame; any depth multiplier) and what its parent applies after it: a
    BatchNorm2d (a BatchNormAct2d brings its activation; a nested Sequential(BN, act) is opened), then an activation
    with a kernel. In a plain nn.Sequential that is what runs next; in any other parent the probe must prove it, and
    the longest run it proves is fused (conv + BN + act, else conv + BN, else the conv alone). What follows and is
    not taken (an activation without a kernel, or one the probe refused) makes the entry half-fused, and the
    report says so (PatchEntry.note);
  * a MixedConv2d-like module (two or more depthwise convs over consecutive channel groups) with its BN and
    activation: one depthwise op call, the kernels zero-padded to the largest (mbkernels.nn.MixedDWConvBNAct);
  * a module whose only weights are two Linear / 1x1-conv layers C -> R -> C (R < C; a BatchNorm after the first
    is folded), or any module with a gate child and 1x1 layers (an effective SE, one layer C -> C), is offered to
    mbkernels.nn.SqueezeExcite.from_module.
  * any other nn.Conv2d (dense, pointwise, grouped) that a BatchNorm2d follows, with the activation after it: the
    BN folded into the conv (mbkernels.nn.ConvBNAct), matched and proven like the depthwise runs.
Every depthwise conv and SE-like module the planner visits gets an entry: fused, or left alone with the reason.
Every swap is checked numerically before it is made: the stock modules in float64 against the fused ones in
float32 with the reference backend, on a random probe, with random BatchNorm statistics; a mismatch is refused
and reported. In a parent other than a plain Sequential the whole parent runs, so a forward that does not apply
the BN (or the activation) right after the conv is caught. All swaps are made at the end, all or none.
"""
import copy
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from . import activations, backends, dispatch
from .nn._cache import EagerWindow
from .nn.conv_bn_act import ConvBNAct
from .nn.dwconv import DWConvBNAct, FusedInto, carried_activation, check_depthwise, check_norm
from .nn.inverted_residual import InvertedResidual
from .nn.mixed_conv import MixedDWConvBNAct
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
    note: str = ""  # fused entries: what runs on its own right after (a half fusion), e.g. an activation


@dataclass
class BlockDecision:
    """The planner's choice for one inverted-residual block: block fusion or layer fusion, from the cost model's
    estimates per input pixel in float16 (see BlockKind)."""
    path: str
    shape: str
    plan: str  # "block" or "layers"
    block_bytes: float  # HBM bytes per input pixel, block fusion
    layer_bytes: float  # the same, layer fusion
    recompute: float  # the expand conv's work on the GPU tiles over its ideal (halo recompute)
    reason: str = ""  # why layers, where chosen


@dataclass
class PatchReport:
    """fused: fused modules in the model; fusable: matches not swapped yet (patch_report of a stock model);
    skipped: what looked close but was left alone, with the reason; blocks: the planner's decision for each
    inverted-residual block it matched (block or layer fusion, estimated bytes)."""
    fused: list = field(default_factory=list)
    fusable: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    blocks: list = field(default_factory=list)

    def count(self, kind: str, status: str = "fused") -> int:
        return sum(entry.kind == kind for entry in getattr(self, status))

    def summary(self) -> str:
        def counts(status):
            return ", ".join(f"{self.count(kind, status)} {label}" for kind, label in KINDS.items())
        text = f"fused: {counts('fused')}"
        half = sum(bool(entry.note) for entry in self.fused + self.fusable)
        if half:
            text += f" ({half} half-fused)"
        if self.fusable:
            text += f"; fusable (not patched yet): {counts('fusable')}"
        return text + f"; left alone: {len(self.skipped)}"

    def __str__(self) -> str:
        lines = [f"mbkernels patch report -- {self.summary()}"]
        if not (self.fused or self.fusable or self.skipped):
            lines.append("  nothing to fuse: no depthwise conv, no squeeze-excite and no conv + BatchNorm found")
        for title, entries in (("fused", self.fused), ("fusable, not patched yet", self.fusable)):
            if entries:
                lines.append(f"{title}:")
                lines += _table([("module", "kind", "shape", "activation")]
                                + [(e.path, KINDS[e.kind], e.shape, e.activation + (f"; half-fused: {e.note}"
                                                                                    if e.note else ""))
                                   for e in entries])
        if self.blocks:
            lines.append("block plans (estimated HBM bytes per input pixel, float16):")
            lines += _table([("module", "shape", "plan", "block B/px", "layers B/px", "expand work", "why")]
                            + [(d.path, d.shape, d.plan, f"{d.block_bytes:.0f}", f"{d.layer_bytes:.0f}",
                                f"x{d.recompute:.2f}", d.reason) for d in self.blocks])
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


def _se_shape(module: nn.Module) -> str:
    shapes = _se_layers(module)
    if shapes:
        return f"C={shapes[0][0]} R={shapes[0][1]}"
    channels = _in_channels(_gated_layers(module))
    return f"C={channels}" if channels is not None else ""


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

    def note(self, fused: nn.Module) -> str:
        """What still runs on its own right after a fused module of this kind ("": nothing; see PatchEntry.note)."""
        return ""


@dataclass
class _Run:
    """What one fused depthwise module takes from its parent: (slot, module) of the conv, and of the norm and the
    activation it folds in (None: not taken); `left` names what still runs on its own (a half fusion)."""
    conv: tuple
    norm: Optional[tuple] = None
    act: Optional[tuple] = None
    left: str = ""
    act_guessed: bool = False  # act is not the next module but the parent's one activation: refused, it is no news


def _following(children: list, i: int) -> list:
    """(slot, module) of what follows children[i] in the parent, a plain Sequential that starts with a BatchNorm
    (conv -> Sequential(BN, act)) opened into its children ("5.0", "5.1")."""
    following = []
    for name, child in children[i + 1:]:
        if _is_plain_sequential(child) and isinstance(next(child.children(), None), nn.BatchNorm2d):
            following += [(f"{name}.{inner}", m) for inner, m in child.named_children()]
        else:
            following.append((name, child))
    return following


class DWConvKind(FusionKind):
    """A depthwise nn.Conv2d (or timm's Conv2dSame; any depth multiplier) with what the parent applies after it:
    a BatchNorm2d (a BatchNormAct2d brings its activation), then an activation with a kernel. In a plain Sequential
    the next modules are what runs next; in any other parent the probe must prove it, and the longest run it proves
    is fused (conv + BN + act, else conv + BN, else the conv alone, which is exact by itself). What is not taken
    while it follows (an activation without a kernel, or one the probe did not prove) makes the entry half-fused."""
    kind, label, fused_type = "dwconv_bn_act", "dwconv+bn+act", DWConvBNAct

    def is_candidate(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1

    def check_conv(self, conv: nn.Module) -> None:
        check_depthwise(conv)

    def offered(self, children: list, i: int, taken: set) -> bool:
        name, module = children[i]
        return name not in taken and self.is_candidate(module)

    def candidates(self, parent, path, children, taken):
        for i, (name, conv) in enumerate(children):
            if self.offered(children, i, taken):
                match = _DWMatch(self, parent, children, i, taken)
                yield Candidate(f"{path}{name}", self.shape(conv), match.build, match.check)

    def runs(self, parent: nn.Module, children: list, i: int, taken: set) -> list:
        """The runs to try for the conv children[i], longest first; Skip when the conv itself cannot be fused."""
        conv_item = children[i]
        try:
            self.check_conv(conv_item[1])
        except ValueError as error:
            raise Skip(str(error)) from None
        following = [(slot, m) for slot, m in _following(children, i) if slot not in taken]
        if following and type(following[0][1]) is nn.Identity:
            following = following[1:]  # an absent norm (ConvNormAct(norm=Identity)): nothing to take
        norm_item, why_not_norm = None, ""
        if following and isinstance(following[0][1], nn.BatchNorm2d):
            try:
                check_norm(following[0][1])
                norm_item, following = following[0], following[1:]
            except ValueError as error:
                why_not_norm = str(error)
        act_item, why_not_act = None, ""
        if norm_item is None or carried_activation(norm_item[1]) is None:
            act_item, why_not_act = self.activation_after(parent, following, children, taken)
        alone = _Run(conv_item, left=why_not_norm)
        guessed = act_item is not None and act_item not in following[:1]
        if norm_item is None:
            return [_Run(conv_item, act=act_item, act_guessed=guessed), _Run(conv_item, left=why_not_act)] \
                if act_item else [_Run(conv_item, left=why_not_norm or why_not_act)]
        with_norm = _Run(conv_item, norm_item, left=why_not_act)
        if act_item is None:
            return [with_norm, alone]
        return [_Run(conv_item, norm_item, act_item, act_guessed=guessed), with_norm, alone]

    def activation_after(self, parent, following, children, taken):
        """((slot, act) that may run right after the conv (+ norm), or None; why an activation stays unfused)."""
        plain = _is_plain_sequential(parent)
        if following:
            slot, act = following[0]
            if activations.identify_activation(act) is not None:
                return (slot, act), ""
            if _is_activation_module(act):
                return None, f"{type(act).__name__} after it has no fused kernel and runs on its own"
            if plain:
                return None, ""
        if plain:
            return None, ""
        # A parent that registers its activation elsewhere (mobileone: se, act, then conv): its one activation
        # child, which the probe must prove runs right after.
        acts = [(name, m) for name, m in children if name not in taken and type(m) is not nn.Identity
                and activations.identify_activation(m) is not None]
        return (acts[0], "") if len(acts) == 1 else (None, "")

    def fused(self, run: _Run, backend, slots: bool):
        """The fused module of a run (with the stock slot names when it goes into the model)."""
        names = {"conv": run.conv[0]}
        if run.norm:
            names["bn"] = run.norm[0]
        if run.act:
            names["act"] = run.act[0]
        return self.fused_type(run.conv[1], run.norm[1] if run.norm else None, run.act[1] if run.act else None,
                               backend=backend, stock_slots=names if slots else None)

    def items(self, run: _Run) -> list:
        try:
            fused = self.fused(run, self.planner.backend, slots=True)
        except ValueError as error:
            raise Skip(str(error)) from None
        fused.half_fused = run.left
        name = run.conv[0]
        taken = [item for item in (run.norm, run.act) if item]
        return [(name, fused, run.conv[1])] + [(slot, FusedInto(name, m, fused), m) for slot, m in taken]

    def check(self, parent: nn.Module, run: _Run) -> Optional[str]:
        generator = self.planner.generator
        conv = run.conv[1]
        reach = [d * (k - 1) for d, k in zip(self.dilation(conv), self.kernel(conv))]
        items = (run.conv, run.norm, run.act)
        if _is_plain_sequential(parent) or (run.norm is None and run.act is None):
            # What runs is certain: the run by itself (a conv alone is exact whatever the parent does).
            stock = _probe_copy(nn.Sequential(*[item[1] for item in items if item]), generator)
            copies = iter(stock)
            reference = self.fused(_Run(*[item and (item[0], next(copies)) for item in items]), "reference", False)
            return _compare(stock, reference, _probe(self.in_channels(conv), reach[0] + 3, reach[1] + 4, generator))
        # Any other parent runs whole, so a forward that does not apply the BN or the act right after is caught.
        stock = _probe_copy(parent, generator)
        swapped = copy.deepcopy(stock)
        copies = [item and (item[0], _get_slot(swapped, item[0])) for item in items]
        _set_slot(swapped, run.conv[0], self.fused(_Run(*copies), "reference", slots=False))
        for item in copies[1:]:
            if item is not None:
                _set_slot(swapped, item[0], nn.Identity())
        size = 4 + max(reach)
        return _compare_parents(stock, swapped, self.in_channels(conv), size, generator)

    def shape(self, conv) -> str:
        return _conv_shape(conv)

    def in_channels(self, conv) -> int:
        return conv.in_channels

    def kernel(self, conv) -> tuple:
        return tuple(conv.kernel_size)

    def dilation(self, conv) -> tuple:
        return tuple(conv.dilation)

    def describe(self, fused):
        return self.shape(fused.conv), fused.activation

    def note(self, fused) -> str:
        return getattr(fused, "half_fused", "")


class _DWMatch:
    """One depthwise conv's candidate: build tries the runs longest first, each checked on a probe, and keeps the
    first that matches; check then says whether one did (the failure of the longest when none did)."""

    def __init__(self, kind: DWConvKind, parent, children, i, taken):
        self.kind, self.parent, self.children, self.i, self.taken = kind, parent, children, i, taken
        self.failure = None

    def build(self):
        runs = self.kind.runs(self.parent, self.children, self.i, self.taken)
        failures = []
        for run in runs:
            failure = _checked(functools.partial(self.kind.check, self.parent, run))
            if failure is None:
                # A longer run did not match: what it would have taken more runs on its own.
                longest = [runs[0].norm, None if runs[0].act_guessed else runs[0].act]
                left = [type(item[1]).__name__ for item in longest if item and item not in (run.norm, run.act)]
                if left:
                    run.left = f"{' + '.join(left)} runs on its own (fusing it too: {failures[0]})"
                return self.kind.items(run)
            failures.append(failure)
        self.failure = failures[0]
        return []

    def check(self):
        return self.failure


class MixedConvKind(DWConvKind):
    """MixNet's MixedConv2d (a module whose children are two or more depthwise convs over consecutive channel
    groups, with different kernel sizes), with its BatchNorm and activation: one depthwise op call
    (mbkernels.nn.MixedDWConvBNAct: the kernels zero-padded to the largest), reported as a dwconv+bn+act."""
    kind, label, fused_type = "dwconv_bn_act", "dwconv+bn+act", MixedDWConvBNAct

    def is_candidate(self, module):
        convs = list(module.children())
        return (not isinstance(module, (nn.Sequential, nn.Conv2d)) and len(convs) >= 2
                and all(isinstance(c, nn.Conv2d) and c.groups == c.in_channels > 1 for c in convs))

    def check_conv(self, mixed):
        MixedDWConvBNAct.check_conv(mixed)

    def shape(self, mixed) -> str:
        convs = list(mixed.children())
        kernels = ",".join(f"{c.kernel_size[0]}x{c.kernel_size[1]}" for c in convs)
        return f"C={sum(c.in_channels for c in convs)} k={kernels} s={convs[0].stride[0]}"

    def in_channels(self, mixed) -> int:
        return sum(c.in_channels for c in mixed.children())

    def kernel(self, mixed) -> tuple:
        return tuple(max(c.kernel_size[d] for c in mixed.children()) for d in (0, 1))

    def dilation(self, mixed) -> tuple:
        return tuple(next(mixed.children()).dilation)


class ConvKind(DWConvKind):
    """Any other nn.Conv2d (dense, pointwise, grouped; timm's Conv2dSame) that a BatchNorm2d follows, with the
    activation after that: the BN folded into the conv (mbkernels.nn.ConvBNAct), the runs matched and proven as
    DWConvKind's are, but only those that take the BN. A conv with no BatchNorm after it is left as it is (nothing
    to fold) and gets no entry."""
    kind, label, fused_type = "conv_bn_act", "conv+bn+act", ConvBNAct

    def is_candidate(self, module):
        return isinstance(module, nn.Conv2d) and not module.groups == module.in_channels > 1

    def check_conv(self, conv):
        ConvBNAct.check_conv(conv)

    def offered(self, children, i, taken):
        following = [m for slot, m in _following(children, i) if slot not in taken and type(m) is not nn.Identity]
        return super().offered(children, i, taken) and bool(following) and isinstance(following[0], nn.BatchNorm2d)

    def runs(self, parent, children, i, taken):
        runs = super().runs(parent, children, i, taken)
        folding = [run for run in runs if run.norm is not None]
        if not folding:
            raise Skip(runs[-1].left or "the BatchNorm after it cannot be folded")
        return folding


def _gated_layers(module: nn.Module) -> list:
    """The Linear / 1x1-conv children of a module that also has a gate child (sigmoid, hardsigmoid): an SE-like
    module (an effective SE's one layer, an SE's two); [] for anything else."""
    children = list(module.children())
    if not any(activations.identify_gate(child) is not None for child in children):
        return []
    return [child for child in children if isinstance(child, nn.Linear)
            or (isinstance(child, nn.Conv2d) and tuple(child.kernel_size) == (1, 1))]


class SqueezeExciteKind(FusionKind):
    """A module whose only weights are two Linear / 1x1-conv layers C -> R -> C (R < C; BatchNorms aside), or any
    other SE-like module (a gate child and 1x1 layers, e.g. an effective SE's one layer C -> C), offered to
    mbkernels.nn.SqueezeExcite.from_module; what it refuses is reported with its reason."""
    kind, label, fused_type = "squeeze_excite", "squeeze-excite", SqueezeExcite

    def candidates(self, parent, path, children, taken):
        for name, module in children:
            if name in taken:
                continue
            layers = _se_layers(module)
            channels = layers[0][0] if layers else _in_channels(_gated_layers(module))
            if channels is not None:
                yield Candidate(f"{path}{name}", _se_shape(module), functools.partial(self.build, name, module),
                                functools.partial(self.check, module, channels))

    def build(self, name, module):
        try:
            return [(name, SqueezeExcite.from_module(module, backend=self.planner.backend), module)]
        except ValueError as error:
            raise Skip(str(error)) from None

    def check(self, module, channels):
        generator = self.planner.generator
        stock = _probe_copy(module, generator)
        reference = SqueezeExcite.from_module(copy.deepcopy(stock), backend="reference")
        return _compare(stock, reference, _probe(channels, 5, 7, generator))

    def describe(self, fused):
        reduced, channels = fused.reduce_layer.weight.shape[:2]
        return f"C={channels} R={reduced}" + ("" if fused.expand_layer is not None else " (one layer)"), \
            _se_activation(fused)


def _holds_one_block(module: nn.Module) -> bool:
    """Worth offering to InvertedResidual.from_module: one depthwise conv, one or two 1x1 convs, BatchNorms."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    depthwise = sum(conv.groups == conv.in_channels > 1 for conv in convs)
    pointwise = sum(tuple(conv.kernel_size) == (1, 1) and conv.groups == 1 for conv in convs)
    return depthwise == 1 and pointwise >= 1 and any(isinstance(m, nn.BatchNorm2d) for m in module.modules())


class BlockKind(FusionKind):
    """A whole inverted-residual block (mbkernels.nn.InvertedResidual.from_module: timm's InvertedResidual and
    DepthwiseSeparableConv, torchvision's InvertedResidual and MBConv, hand-written blocks), fused when the cost
    model says block fusion beats layer fusion on the GPU its weights are on (a CPU model gets layer fusion: the
    reference backend runs a block as the same convs); otherwise left to the layer kinds, which fuse inside it.

    The cost model, per input pixel in float16 on the GPU the kernels aim at (an H200): block fusion saves the
    HBM bytes of the expanded activations (nn.InvertedResidual.traffic: layers minus block) at the measured copy
    bandwidth, and pays for what its small tiles re-read from L2 (every tile reads all weights: the Triton
    launcher's l2_reads) and for the expand conv it recomputes over tile halos (expand_recompute). A block the
    Triton kernel declines (its limit: registers, shared memory), or that a named backend cannot run, gets layer
    fusion. The L2 and tensor-core rates are assumptions until a GPU measures them."""
    kind, label, fused_type = "inverted_residual", "block", InvertedResidual
    BANDWIDTH = 4.3e12  # bytes/s: H200 copy bandwidth, measured (toolchain.md)
    L2_BANDWIDTH = 1e13  # bytes/s: assumed, about 2.3x HBM's
    TENSOR_FLOPS = 2e14  # FLOP/s: assumed, 20% of H200's dense fp16 peak for these small dots
    PLANE = 28  # the input plane of the estimate: bytes and FLOPs both scale with it, the choice barely does

    def __init__(self, planner: "_Planner"):
        super().__init__(planner)
        self.layer_planned = []  # paths of blocks planned for layer fusion: the modules inside are the same block

    def candidates(self, parent, path, children, taken):
        for name, module in children:
            inside = any(f"{path}{name}".startswith(f"{outer}.") for outer in self.layer_planned)
            if (name not in taken and not inside and not isinstance(module, self.planner.fused_types)
                    and _holds_one_block(module)):
                yield Candidate(f"{path}{name}", "", functools.partial(self.build, name, module, f"{path}{name}"),
                                functools.partial(self.check, module))

    def build(self, name, module, path):
        try:
            fused = InvertedResidual.from_module(module, backend=self.planner.backend)
        except ValueError as error:
            raise Skip(str(error)) from None
        decision = self.decide(fused, path)
        self.planner.report.blocks.append(decision)
        if decision.plan != "block":
            self.layer_planned.append(path)
            raise Skip(f"layer fusion planned: {decision.reason}")
        return [(name, fused, module)]

    @staticmethod
    def on_gpu(fused: InvertedResidual) -> bool:
        return any(t.is_cuda for t in fused.stock.parameters())

    def decide(self, fused: InvertedResidual, path: str) -> BlockDecision:
        parts = fused.parts
        dw = fused.stock.get_submodule(parts.dw_conv)
        channels = fused.stock.get_submodule(parts.expand_conv).in_channels if parts.expand_conv else dw.in_channels
        pixels = self.PLANE * self.PLANE
        shape = (1, channels, self.PLANE, self.PLANE)
        bytes_moved = fused.traffic(shape, element_size=2)
        block, layers = bytes_moved["block"] / pixels, bytes_moved["layers"] / pixels
        named = dispatch.requested_backend(self.planner.backend)
        if named is not None and "inverted_residual" not in backends.get(named).ops:
            return BlockDecision(path, fused.shape, "layers", block, layers, 1.0,
                                 f"the {named} backend has no inverted_residual kernel")
        try:
            from .backends.triton import inverted_residual as triton_block
        except ImportError:  # no triton here: nothing recomputes halos, the reference backend runs the block
            return BlockDecision(path, fused.shape, "block", block, layers, 1.0)
        args = fused.bundle(torch.empty(shape, dtype=torch.float16).contiguous(memory_format=torch.channels_last))
        recompute = triton_block.expand_recompute(args)
        declined = triton_block.limit(args, interpreter=False)
        if declined is not None:
            return BlockDecision(path, fused.shape, "layers", block, layers, recompute,
                                 f"the Triton block kernel declines it: {declined}")
        if self.planner.blocks == "all":
            return BlockDecision(path, fused.shape, "block", block, layers, recompute, "blocks='all'")
        if not self.on_gpu(fused):
            # The cost model is the GPU's; on the CPU the reference backend runs a block as the very convs of layer
            # fusion, with more Python per call.
            return BlockDecision(path, fused.shape, "layers", block, layers, recompute,
                                 "a CPU model: block fusion saves nothing there (patch after .cuda() for the GPU plan)")
        expand_flops = 2 * channels * dw.in_channels if parts.expand_conv else 0  # per input pixel
        saved_s = (layers - block) / self.BANDWIDTH
        l2_s = triton_block.l2_reads(args) / self.L2_BANDWIDTH
        recompute_s = expand_flops * (recompute - 1) / self.TENSOR_FLOPS
        if saved_s <= l2_s + recompute_s:
            return BlockDecision(path, fused.shape, "layers", block, layers, recompute,
                                 f"the tiles' L2 re-reads ({l2_s * 1e12:.0f} ps/px) and halo recompute "
                                 f"({recompute_s * 1e12:.0f} ps/px) cost more than the HBM bytes block fusion "
                                 f"saves ({saved_s * 1e12:.0f} ps/px)")
        return BlockDecision(path, fused.shape, "block", block, layers, recompute)

    def check(self, module):
        generator = self.planner.generator
        stock = _probe_copy(module, generator)
        reference = InvertedResidual.from_module(copy.deepcopy(stock), backend="reference")
        dw = reference.stock.get_submodule(reference.parts.dw_conv)
        channels = (reference.stock.get_submodule(reference.parts.expand_conv).in_channels
                    if reference.parts.expand_conv else dw.in_channels)
        size = 4 + max(d * (k - 1) for d, k in zip(dw.dilation, dw.kernel_size))
        return _compare(stock, reference, _probe(channels, size, size + 1, generator))

    def describe(self, fused):
        return fused.shape, fused.extra_repr().split("activations=")[1].split(",")[0]


def _in_channels(layers: list) -> Optional[int]:
    """The input channels of the first of an SE-like module's layers, or None when there are none."""
    if not layers:
        return None
    return layers[0].in_features if isinstance(layers[0], nn.Linear) else layers[0].in_channels


# A block is offered whole first; the other convs' folds last, after the SEs (whose 1x1 layers are theirs).
FUSION_KINDS = (BlockKind, DWConvKind, MixedConvKind, SqueezeExciteKind, ConvKind)
KINDS = {kind.kind: kind.label for kind in (DWConvKind, MixedConvKind, SqueezeExciteKind, BlockKind, ConvKind)}


# ------------------------------------------------------------------------------------------------ planning
@dataclass
class _Swap:
    parent: nn.Module
    assignments: list  # [(slot name, new module)], applied in order
    entry: PatchEntry


class _Planner:
    def __init__(self, backend: Optional[str], kinds: tuple, blocks=True):
        self.backend = backend
        self.blocks = blocks  # BlockKind's mode: True (the cost model decides) or "all"
        self.kinds = [kind(self) for kind in kinds]
        self.fused_types = tuple(kind.fused_type for kind in FUSION_KINDS)
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
            if type(module) is kind.fused_type:  # exactly: MixedDWConvBNAct is a DWConvBNAct of another kind
                self.report.fused.append(PatchEntry(path, kind.kind, *kind.describe(module), note=kind.note(module)))
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
        entry = PatchEntry(candidate.path, kind.kind, shape, activation, note=kind.note(fused))
        self.swaps.append(_Swap(parent, [(slot, new) for slot, new, _ in items], entry))
        return [slot for slot, _, _ in items]


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _get_slot(parent: nn.Module, slot: str) -> nn.Module:
    """The module in a slot of parent: a child's name, or a dotted path into a child ("5.0")."""
    return parent.get_submodule(slot)


def _set_slot(parent: nn.Module, slot: str, module: nn.Module) -> None:
    owner, _, name = slot.rpartition(".")
    setattr(parent.get_submodule(owner) if owner else parent, name, module)


def _compare_parents(stock: nn.Module, swapped: nn.Module, conv_channels: int, size: int,
                     generator: torch.Generator) -> Optional[str]:
    """_compare for whole parents. Their input channels are those of the first module in them that states them (a
    MixedConv2d before its splits), or else the checked conv's: the first guess the parents run on is used."""
    stated = [m.in_channels for m in stock.modules() if isinstance(getattr(m, "in_channels", None), int)]
    guesses = list(dict.fromkeys(stated[:1] + [conv_channels]))
    for channels in guesses:
        try:
            return _compare(stock, swapped, _probe(channels, size, size + 1, generator))
        except Exception:  # not the parent's input (or a real failure, raised from the last guess)
            if channels == guesses[-1]:
                raise


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


def _plan(model: nn.Module, backend: Optional[str], dwconv: bool, se: bool, blocks=True, convs: bool = True) -> _Planner:
    _refuse_meta_tensors(model)
    wanted = {"dwconv_bn_act": dwconv, "squeeze_excite": se, "inverted_residual": blocks, "conv_bn_act": convs}
    if blocks not in (True, False, "all"):
        raise ValueError(f"blocks must be True, False or 'all', got {blocks!r}")
    planner = _Planner(backend, tuple(kind for kind in FUSION_KINDS if wanted.get(kind.kind, True)), blocks)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the probes are tiny: thread start-up would cost more than it saves
    try:
        planner.visit(model, "")
    finally:
        torch.set_num_threads(threads)
    return planner


# ----------------------------------------------------------------------------------------------- public
def patch(model: nn.Module, backend: Optional[str] = None, dwconv: bool = True, se: bool = True,
          verbose: bool = False, blocks=True, convs: bool = True) -> nn.Module:
    """Swap, in place, every depthwise conv -> BatchNorm -> activation run for mbkernels.nn.DWConvBNAct, every
    squeeze-excite for mbkernels.nn.SqueezeExcite and every other conv -> BatchNorm -> activation run for
    mbkernels.nn.ConvBNAct; return the model.

    backend: the backend the fused modules ask for (None: the best available at each call). Each swap is checked
    on a probe first and refused when it does not match; state_dict keys and values stay those of the stock model.
    Patching a patched model changes nothing. If a swap fails half-way, the model is left as it was.
    verbose: print patch_report's table.
    blocks: fuse whole inverted-residual blocks (mbkernels.nn.InvertedResidual) where the planner's cost model
    prefers them to layer fusion (see BlockKind); False keeps layer fusion only; "all" fuses every block the
    Triton kernel accepts, whatever the cost model says (to measure the block kernels).
    convs: fold the BatchNorm (and the activation) after every other conv (dense, pointwise, grouped) into it
    (mbkernels.nn.ConvBNAct): PyTorch's own conv on folded weights, one pass over memory less per layer.
    """
    planner = _plan(model, backend, dwconv, se, blocks, convs)
    done = []  # (parent, slot, previous module), to undo
    try:
        for swap in planner.swaps:
            for slot, module in swap.assignments:
                done.append((swap.parent, slot, _get_slot(swap.parent, slot)))
                _set_slot(swap.parent, slot, module)
    except BaseException:
        for parent, slot, previous in reversed(done):
            _set_slot(parent, slot, previous)
        raise
    EagerWindow.attach(model)
    report = planner.report
    report.fused += [swap.entry for swap in planner.swaps]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.fused.sort(key=lambda entry: order.get(entry.path, -1))
    if verbose:
        print(report)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put back, in place, the stock modules (the very objects) that patch swapped out; return the model."""
    EagerWindow.detach(model)
    for parent in list(model.modules()):
        for _, child in list(parent.named_children()):
            for slot, stock in getattr(child, _RESTORE, ()):
                stock.train(child.training)
                _set_slot(parent, slot, stock)
    return model


def patch_report(model: nn.Module, backend: Optional[str] = None, dwconv: bool = True,
                 se: bool = True, blocks=True, convs: bool = True) -> PatchReport:
    """What is fused in model, what patch would fuse (fusable), what was left alone and why, and each block's
    plan (block or layer fusion, estimated bytes). Changes nothing."""
    planner = _plan(model, backend, dwconv, se, blocks, convs)
    planner.report.fusable = [swap.entry for swap in planner.swaps]
    return planner.report
