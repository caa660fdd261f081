"""The fusion kinds behind the planner's one protocol, and the one registry of them.

A kind finds candidates among a parent's children and builds each one's swap, proven on a probe first
(mbkernels.match); what it cannot take it leaves alone with the reason (Skip). The same kind owns its side in
forward code: which patterns of a captured graph (mbkernels.match.dataflow) are its matches, which it takes, and the
fused module of each (the dataflow pass and nn.rewrite ask it). A new kind is one FusionKind class and one REGISTRY
line: the registry drives the planning order, the order in which graph matches take their nodes, patch's keyword
flags and the report's labels.
"""
import copy
import functools
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from ..backends import proof_backend
from .. import activations
from ..match import probe_copy, probe_input, prove
from ..match.probe import describe_failure
from ..match.dataflow import is_whole_forward
from ..match.block import BlockParts, holds_one_block
from ..match.layers import (carried_activation, check_depthwise, check_norm, following, is_activation_module,
                            is_depthwise, is_plain_sequential)
from ..match.padding import static_padding
from ..match.se import SEParts, se_channels, se_shape
from ..nn.conv_bn_act import ConvBNAct
from ..nn.dwconv import DWConvBNAct, FusedInto
from ..nn.inverted_residual import InvertedResidual
from ..nn.mixed_conv import MixedDWConvBNAct
from ..nn.squeeze_excite import SqueezeExcite
from . import cost
from .changes import ABSENT, set_slot  # noqa: F401 (ABSENT: the dataflow pass's and tuning's)


class Skip(Exception):
    """A candidate that a fusion kind leaves alone; the message is the reason the report shows."""


@dataclass
class Candidate:
    """One match a fusion kind found among a parent's children."""
    path: str  # the model path of the module that the fused module replaces (its first slot)
    shape: str
    # Builds the swap, proven on a probe: [(slot name in the parent, new module, stock module)], the fused module
    # first; raises Skip with the reason when it cannot be fused.
    build: Callable[[], list]


class FusionKind:
    """One kind of fusion behind the planner's protocol: find candidates among a parent's children, build each
    (proven on a probe), describe fused modules for the report. Kinds run in REGISTRY order; a child a kind takes is
    not offered to the later ones, and a planned swap's modules are not visited further."""
    kind = ""  # the report's key, e.g. "dwconv_bn_act"
    label = ""  # the report's words, e.g. "dwconv+bn+act"
    fused_type: type = type(None)  # the fused module class this kind puts in

    def __init__(self, planner):
        self.planner = planner

    def candidates(self, parent: nn.Module, path: str, children: list, taken: set):
        """Yield Candidates among parent's (name, child) children (`taken`: names an earlier kind took)."""
        raise NotImplementedError

    def describe(self, fused: nn.Module) -> tuple[str, str]:
        """(shape, activation) of a fused module of this kind, for the report."""
        raise NotImplementedError

    def note(self, fused: nn.Module) -> str:
        """What still runs on its own right after a fused module of this kind ("": nothing; see PatchEntry.note)."""
        return ""

    # ---- in forward code (the dataflow pass): where matches of two kinds overlap, the kind of the lower
    # graph_priority takes the nodes (a block before the SE and the convs in it); None: no graph pattern.
    graph_priority: Optional[int] = None

    @classmethod
    def graph_matches(cls, found) -> list:
        """This kind's matches among the patterns found in a captured graph (a match.dataflow.Matches)."""
        return []

    @staticmethod
    def anchor(match) -> str:
        """The path (in the captured module) of the module a graph match's report entry is for."""
        raise NotImplementedError

    @classmethod
    def from_match(cls, root: nn.Module, match, backend: Optional[str]) -> nn.Module:
        """The fused module of a graph match, holding root's stock modules (nn.rewrite borrows them)."""
        raise NotImplementedError

    def admit(self, parent: nn.Module, path: str, captured, match) -> Optional[str]:
        """Whether the dataflow pass fuses a graph match: "fuse", "time" (fused by its layers now, timed against
        them in a tuned patch) or None (left to the other kinds)."""
        return "fuse"

    def left_in_forward(self, children: list, taken: set, entries: list) -> bool:
        """Whether the parent's children show something of this kind that its forward code may compute (so the
        dataflow pass captures it): children (name, module), `taken` the names the kinds took, entries (child
        name, report entry) of what they fused or refused."""
        return False


def _holder(**modules) -> nn.Module:
    """A module with the given children (None: absent), for the fused modules built from a graph match."""
    holder = nn.Module()
    for name, module in modules.items():
        if module is not None:
            holder.add_module(name, module)
    return holder


def never_called(parent: nn.Module) -> str:
    """Why a module its parent's forward never calls is left alone."""
    return f"never called by the forward of its parent, {type(parent).__name__}: nothing to fuse"


def conv_shape(conv: nn.Conv2d) -> str:
    text = f"C={conv.in_channels} k={conv.kernel_size[0]}x{conv.kernel_size[1]} s={conv.stride[0]}"
    if tuple(conv.dilation) != (1, 1):
        text += f" d={conv.dilation[0]}"
    return text


# ------------------------------------------------------------------------------------------ depthwise runs
@dataclass
class _Run:
    """What one fused depthwise module takes from its parent: (slot, module) of the conv, and of the norm and the
    activation it folds in (None: not taken); `left` names what still runs on its own (a half fusion)."""
    conv: tuple
    norm: Optional[tuple] = None
    act: Optional[tuple] = None
    left: str = ""
    act_guessed: bool = False  # act is not the next module but the parent's one activation: refused, it is no news


class DWConvKind(FusionKind):
    """A depthwise nn.Conv2d (or timm's Conv2dSame; any depth multiplier) with what the parent applies after it:
    a BatchNorm2d (a BatchNormAct2d brings its activation), then an activation with a kernel. In a plain Sequential
    the next modules are what runs next; in any other parent the probe must prove it, and the longest run it proves
    is fused (conv + BN + act, else conv + BN, else the conv alone, which is exact by itself). What is not taken
    while it follows (an activation without a kernel, or one the probe did not prove) makes the entry half-fused."""
    kind, label, fused_type = "dwconv_bn_act", "dwconv+bn+act", DWConvBNAct

    def is_candidate(self, module: nn.Module) -> bool:
        return is_depthwise(module)

    def check_conv(self, conv: nn.Module) -> None:
        check_depthwise(conv)

    def offered(self, children: list, i: int, taken: set) -> bool:
        name, module = children[i]
        return name not in taken and self.is_candidate(module)

    def candidates(self, parent, path, children, taken):
        for i, (name, conv) in enumerate(children):
            if self.offered(children, i, taken):
                yield Candidate(f"{path}{name}", self.shape(conv), functools.partial(self.build, parent, children, i,
                                                                                     taken))

    def runs(self, parent: nn.Module, children: list, i: int, taken: set) -> list:
        """The runs to try for the conv children[i], longest first; Skip when the conv itself cannot be fused."""
        conv_item = children[i]
        try:
            self.check_conv(conv_item[1])
        except ValueError as error:
            raise Skip(str(error)) from None
        after = [(slot, m) for slot, m in following(children, i) if slot not in taken]
        if after and type(after[0][1]) is nn.Identity:
            after = after[1:]  # an absent norm (ConvNormAct(norm=Identity)): nothing to take
        norm_item, why_not_norm = None, ""
        if after and isinstance(after[0][1], nn.BatchNorm2d):
            try:
                check_norm(after[0][1])
                norm_item, after = after[0], after[1:]
            except ValueError as error:
                why_not_norm = str(error)
        act_item, why_not_act = None, ""
        if norm_item is None or carried_activation(norm_item[1]) is None:
            act_item, why_not_act = self.activation_after(parent, after, children, taken)
        alone = _Run(conv_item, left=why_not_norm)
        guessed = act_item is not None and act_item not in after[:1]
        if norm_item is None:
            return [_Run(conv_item, act=act_item, act_guessed=guessed), _Run(conv_item, left=why_not_act)] \
                if act_item else [_Run(conv_item, left=why_not_norm or why_not_act)]
        with_norm = _Run(conv_item, norm_item, left=why_not_act)
        if act_item is None:
            return [with_norm, alone]
        return [_Run(conv_item, norm_item, act_item, act_guessed=guessed), with_norm, alone]

    def activation_after(self, parent, after, children, taken):
        """((slot, act) that may run right after the conv (+ norm), or None; why an activation stays unfused)."""
        plain = is_plain_sequential(parent)
        if after:
            slot, act = after[0]
            if activations.identify_activation(act) is not None:
                return (slot, act), ""
            if is_activation_module(act):
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

    def build(self, parent: nn.Module, children: list, i: int, taken: set) -> list:
        """The swap of the longest run the probe proves (a shorter run is a half fusion: what the longest would
        have taken more runs on its own, and the entry says why)."""
        runs = self.runs(parent, children, i, taken)
        try:
            proven, failures = self.prove(parent, runs)
        except Skip:
            raise
        except Exception as error:  # anything that stops the proof means "not proven equal": refuse the swap
            raise Skip(describe_failure(error)) from None
        if proven is None:
            raise Skip(failures[0])
        run = runs[proven]
        if proven > 0:
            longest = [runs[0].norm, None if runs[0].act_guessed else runs[0].act]
            left = [type(item[1]).__name__ for item in longest if item and item not in (run.norm, run.act)]
            if left:
                run.left = f"{' + '.join(left)} runs on its own (fusing it too: {failures[0]})"
        try:
            fused = self.fused(run, self.planner.backend, slots=True)
        except ValueError as error:
            raise Skip(str(error)) from None
        fused.half_fused = run.left
        name = run.conv[0]
        taken_items = [item for item in (run.norm, run.act) if item]
        return [(name, fused, run.conv[1])] + [(slot, FusedInto(name, m, fused), m) for slot, m in taken_items]

    def prove(self, parent: nn.Module, runs: list) -> tuple[Optional[int], list]:
        """(index of the first run the probe proves or None, the failures of the runs before it). In a plain
        Sequential what runs is certain, and a conv alone is exact whatever the parent does: such a run is proven by
        itself. Any other parent runs whole (stock once, each run swapped in), so a forward that does not apply the
        BN or the act right after the conv is caught."""
        generator = self.planner.generator
        conv = runs[0].conv[1]
        reach = [d * (k - 1) for d, k in zip(self.dilation(conv), self.kernel(conv))]
        by_itself = [is_plain_sequential(parent) or (run.norm is None and run.act is None) for run in runs]
        failures = []
        in_parent = [index for index, alone in enumerate(by_itself) if not alone]
        if in_parent:
            try:
                stock = probe_copy(parent, generator, self.planner.restore)
                variants = [(index, functools.partial(self.swapped_parent, stock, runs[index])) for index in in_parent]
                calls = []
                hook = stock.get_submodule(runs[0].conv[0]).register_forward_pre_hook(lambda *_: calls.append(1))
                call = self.planner.observed_call(parent)
                proof = prove(stock, variants, call[0], kwargs=call[1]) if call else self.prove_parent(
                    stock, variants, self.in_channels(conv), 4 + max(reach), generator,
                    self.planner.observed.get(parent), self.planner.observed_call(parent, tensors=1))
                hook.remove()
            except Exception as error:  # the parent cannot run on a probe: these runs are not proven
                failures += [describe_failure(error)] * len(in_parent)
            else:
                if not calls:  # nothing to prove a swap on: the stock conv never runs
                    raise Skip(never_called(parent))
                failures += [proof.failures[index] for index in in_parent if index in proof.failures]
                if proof.proven is not None:
                    return proof.proven, failures
        for index in (index for index, alone in enumerate(by_itself) if alone):
            items = (runs[index].conv, runs[index].norm, runs[index].act)
            stock = probe_copy(nn.Sequential(*[item[1] for item in items if item]), generator)

            def build(items=items, stock=stock):
                modules = iter(copy.deepcopy(list(stock)))
                return self.fused(_Run(*[item and (item[0], next(modules)) for item in items]), proof_backend(), False)

            proof = prove(stock, [(index, build)],
                          probe_input(self.in_channels(conv), reach[0] + 3, reach[1] + 4, generator))
            if proof.proven is not None:
                return index, failures
            failures.append(proof.failure)
        return None, failures

    def swapped_parent(self, stock: nn.Module, run: _Run) -> nn.Module:
        """A copy of the (probe) parent with the run's modules swapped for a reference-backend fused module."""
        swapped = copy.deepcopy(stock)
        items = (run.conv, run.norm, run.act)
        copies = [item and (item[0], swapped.get_submodule(item[0])) for item in items]
        fused = self.fused(_Run(*copies), proof_backend(), slots=False)
        set_slot(swapped, run.conv[0], fused)
        for item in copies[1:]:
            if item is not None:  # as the swap places it: a stand-in answering the stock module's attributes
                set_slot(swapped, item[0], FusedInto(run.conv[0], item[1], fused))
        return swapped

    @staticmethod
    def prove_parent(stock: nn.Module, variants: list, conv_channels: int, size: int, generator,
                     observed: Optional[int] = None, observed_call: Optional[tuple] = None):
        """prove() for whole parents, on a small plane first: its channels those observed in the model's forward
        (observed: planner.observed), else those of the first module in the parent that states them (a MixedConv2d
        before its splits), or else the checked conv's; the first guess the parent runs on is used. Where none
        does (a deep parent downsamples a small plane to nothing), a call like the one the model's forward made
        (observed_call), at its real size."""
        stated = [m.in_channels for m in stock.modules() if isinstance(getattr(m, "in_channels", None), int)]
        guesses = list(dict.fromkeys(([observed] if observed else []) + stated[:1] + [conv_channels]))
        for channels in guesses:
            try:
                return prove(stock, variants, probe_input(channels, size, size + 1, generator))
            except Exception:  # not the parent's input (or a real failure, raised from the last try)
                if channels == guesses[-1] and observed_call is None:
                    raise
        return prove(stock, variants, observed_call[0], kwargs=observed_call[1])

    def shape(self, conv) -> str:
        return conv_shape(conv)

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

    graph_priority = 2

    @classmethod
    def graph_matches(cls, found):
        return [run for run in found.runs if run.depthwise]

    def left_in_forward(self, children, taken, entries):
        """A conv child left alone, half-fused or fused without an activation (the forward may apply one as a
        function), or a conv that pads nothing itself (the forward may pad before it: TensorFlow 'SAME')."""
        convs = {name for name, child in children if isinstance(child, nn.Conv2d)}
        if any(child in convs and (entry.reason or entry.note or entry.activation == "identity")
               for child, entry in entries):
            return True
        return any(isinstance(child, nn.Conv2d) and max(child.kernel_size) > 1 and static_padding(child) == [0] * 4
                   for _, child in children)

    @staticmethod
    def anchor(run):
        return run.conv

    @classmethod
    def from_match(cls, root, run, backend):
        norm = root.get_submodule(run.norm) if run.norm else None
        return cls.fused_type(root.get_submodule(run.conv), norm, None, backend=backend, pad_before=run.pad_before,
                              activation=run.activation)


class MixedConvKind(DWConvKind):
    """MixNet's MixedConv2d (a module whose children are two or more depthwise convs over consecutive channel
    groups, with different kernel sizes), with its BatchNorm and activation: one depthwise op call
    (mbkernels.nn.MixedDWConvBNAct: the kernels zero-padded to the largest), reported as a dwconv+bn+act."""
    kind, label, fused_type = "dwconv_bn_act", "dwconv+bn+act", MixedDWConvBNAct

    def is_candidate(self, module):
        convs = list(module.children())
        return (not isinstance(module, (nn.Sequential, nn.Conv2d)) and len(convs) >= 2
                and all(is_depthwise(c) for c in convs))

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

    graph_priority = None  # a forward's MixedConv2d is a module: the tree finds it


class ConvKind(DWConvKind):
    """Any other nn.Conv2d (dense, pointwise, grouped; timm's Conv2dSame) that a BatchNorm2d follows, with the
    activation after that: the BN folded into the conv (mbkernels.nn.ConvBNAct), the runs matched and proven as
    DWConvKind's are, but only those that take the BN. A conv with no BatchNorm after it is left as it is (nothing
    to fold) and gets no entry."""
    kind, label, fused_type = "conv_bn_act", "conv+bn+act", ConvBNAct

    def is_candidate(self, module):
        return isinstance(module, nn.Conv2d) and not is_depthwise(module)

    def check_conv(self, conv):
        ConvBNAct.check_conv(conv)

    def offered(self, children, i, taken):
        after = [m for slot, m in following(children, i) if slot not in taken and type(m) is not nn.Identity]
        return super().offered(children, i, taken) and bool(after) and isinstance(after[0], nn.BatchNorm2d)

    def runs(self, parent, children, i, taken):
        runs = super().runs(parent, children, i, taken)
        folding = [run for run in runs if run.norm is not None]
        if not folding:
            raise Skip(runs[-1].left or "the BatchNorm after it cannot be folded")
        return folding

    @classmethod
    def graph_matches(cls, found):
        return [run for run in found.runs if not run.depthwise]


# ------------------------------------------------------------------------------------------ squeeze-excite
class SqueezeExciteKind(FusionKind):
    """A module whose only weights are two Linear / 1x1-conv layers C -> R -> C (R < C; BatchNorms aside), or any
    other SE-like module (a gate child and 1x1 layers, e.g. an effective SE's one layer C -> C), offered to
    mbkernels.nn.SqueezeExcite.from_module (which proves it); what it refuses is reported with its reason."""
    kind, label, fused_type = "squeeze_excite", "squeeze-excite", SqueezeExcite

    def candidates(self, parent, path, children, taken):
        for name, module in children:
            if name not in taken and se_channels(module) is not None:
                yield Candidate(f"{path}{name}", se_shape(module), functools.partial(self.build, name, module))

    def build(self, name, module):
        try:
            return [(name, SqueezeExcite.from_module(module, backend=self.planner.backend), module)]
        except ValueError as error:
            raise Skip(str(error)) from None

    def describe(self, fused):
        reduced, channels = fused.reduce_layer.weight.shape[:2]
        return (f"C={channels} R={reduced}" + ("" if fused.expand_layer is not None else " (one layer)"),
                f"{fused.activation} -> {fused.gate}")

    graph_priority = 1

    @classmethod
    def graph_matches(cls, found):
        return found.ses

    def left_in_forward(self, children, taken, entries):
        """1x1 layers no kind took that could be an SE computed in forward: C -> R and R -> C, or one C -> C."""
        free = [shape for name, child in children if name not in taken for shape in [_layer_channels(child)] if shape]
        return any(c_in == c_out for c_in, c_out in free) or any((r, c) in free for c, r in free if r < c)

    @staticmethod
    def anchor(se):
        return se.reduce

    @classmethod
    def from_match(cls, root, se, backend):
        get = lambda path: root.get_submodule(path) if path else None  # noqa: E731
        holder = _holder(reduce=get(se.reduce), expand=get(se.expand), norm=get(se.norm))
        parts = SEParts("reduce", "expand" if se.expand else None, se.activation, se.gate, "norm" if se.norm else None)
        return SqueezeExcite(holder, parts, backend=backend)


def _layer_channels(module: nn.Module) -> Optional[tuple]:
    """(in, out) of a Linear or 1x1 conv with groups 1 (an SE's layer), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1:
        return module.in_channels, module.out_channels
    return None


# ------------------------------------------------------------------------------------------ blocks
@dataclass
class BlockAlternative:
    """A block the planner fused by layers so that tuning can time the whole-block kernel against them."""
    path: str
    parent: nn.Module
    slot: str  # the block's name in parent
    block: nn.Module  # the stock block (with the layer fusion inside it, once applied)
    fused: InvertedResidual  # block fusion of it, built and proven when planned

    def layers(self):
        """The block as layer fusion runs it: a callable of its input."""
        return self.block

    def swap(self) -> tuple:
        """(parent, [(slot, new)], ((slot, what it held), ...), the fused modules, the report's PatchEntry fields
        of each) of fusing the block whole."""
        entry = {"path": self.path, "kind": BlockKind.kind, "shape": self.fused.shape, "activation": ""}
        return self.parent, [(self.slot, self.fused)], ((self.slot, self.block),), [self.fused], [entry]


class BlockKind(FusionKind):
    """A whole inverted-residual block (mbkernels.nn.InvertedResidual.from_module: timm's InvertedResidual and
    DepthwiseSeparableConv, torchvision's InvertedResidual and MBConv, hand-written blocks), fused when block fusion
    beats layer fusion (measured in a tuned patch, else by the cost model: mbkernels.planner.cost); otherwise left
    to the layer kinds, which fuse inside it."""
    kind, label, fused_type = "inverted_residual", "block", InvertedResidual

    def __init__(self, planner):
        super().__init__(planner)
        self.layer_planned = []  # paths of blocks planned for layer fusion: the modules inside are the same block

    def candidates(self, parent, path, children, taken):
        for name, module in children:
            inside = any(f"{path}{name}".startswith(f"{outer}.") for outer in self.layer_planned)
            if (name not in taken and not inside and not isinstance(module, self.planner.fused_types)
                    and holds_one_block(module)):
                yield Candidate(f"{path}{name}", "", functools.partial(self.build, parent, name, module,
                                                                       f"{path}{name}"))

    def build(self, parent, name, module, path):
        try:
            fused = InvertedResidual.from_module(module, backend=self.planner.backend)
        except ValueError as error:
            raise Skip(str(error)) from None
        if self.planner.measured and self.planner.blocks is True:
            # Layer fusion inside it now; tuning times the block kernel against it (planner.tuning).
            self.planner.block_alternatives.append(BlockAlternative(path, parent, name, module, fused))
            self.layer_planned.append(path)
            raise Skip("timed against layer fusion (a tuned patch)")
        decision = cost.decide(fused, path, self.planner.backend, every_block=self.planner.blocks == "all")
        self.planner.report.blocks.append(decision)
        if decision.plan != "block":
            self.layer_planned.append(path)
            raise Skip(f"layer fusion planned: {decision.reason}")
        return [(name, fused, module)]

    def describe(self, fused):
        return fused.shape, fused.extra_repr().split("activations=")[1].split(",")[0]

    graph_priority = 0

    @classmethod
    def graph_matches(cls, found):
        return found.blocks

    @staticmethod
    def anchor(block):
        return block.dw.conv

    @classmethod
    def from_match(cls, root, block, backend):
        get = lambda path: root.get_submodule(path) if path else None  # noqa: E731
        expand, dw, se, project = block.expand, block.dw, block.se, block.project
        holder = _holder(expand_conv=get(expand and expand.conv), expand_bn=get(expand and expand.norm),
                         dw_conv=get(dw.conv), dw_bn=get(dw.norm), se_reduce=get(se and se.reduce),
                         se_expand=get(se and se.expand), se_norm=get(se and se.norm), project_conv=get(project.conv),
                         project_bn=get(project.norm))
        name = lambda present, path: path if present else None  # noqa: E731
        parts = BlockParts(
            name(expand, "expand_conv"), name(expand and expand.norm, "expand_bn"),
            expand.activation if expand else "identity", "dw_conv", name(dw.norm, "dw_bn"), dw.activation,
            name(se, "se"), se.activation if se else "relu", se.gate if se else "sigmoid", name(se, "se_reduce"),
            name(se and se.expand, "se_expand"), block.post_se_activation, "project_conv",
            name(project.norm, "project_bn"), project.activation, block.residual,
            se_norm=name(se and se.norm, "se_norm"))
        return InvertedResidual(holder, parts, backend=backend, pad_before=dw.pad_before)

    def admit(self, parent, path, captured, block):
        """A block that is its module's whole forward is timed against its layers in a tuned patch; any other is
        fused where the cost model plans block fusion (the decision goes into the report)."""
        planner = self.planner
        if planner.measured and planner.blocks is True and is_whole_forward(captured, block):
            return "time"
        decision = cost.decide(self.from_match(parent, block, proof_backend()), f"{path}{block.dw.conv}",
                               planner.backend, every_block=planner.blocks == "all")
        planner.report.blocks.append(decision)
        return "fuse" if decision.plan == "block" else None


@dataclass(frozen=True)
class Registered:
    kind: type  # a FusionKind subclass
    flag: str  # patch's keyword that turns it off (several kinds may share one)


# Planning order (and the report's): each kind is offered a parent's children after the kinds above it; the other
# convs' folds come last, after the SEs and blocks (whose 1x1 layers are theirs). Kinds do not compete for the same
# child otherwise: a block is a child of its stage, its depthwise conv a grandchild.
REGISTRY = (
    Registered(DWConvKind, "dwconv"),
    Registered(MixedConvKind, "dwconv"),
    Registered(SqueezeExciteKind, "se"),
    Registered(BlockKind, "blocks"),
    Registered(ConvKind, "convs"),
)
FLAGS = tuple(dict.fromkeys(entry.flag for entry in REGISTRY))
KIND_LABELS = {entry.kind.kind: entry.kind.label for entry in REGISTRY}  # the report's words per kind
