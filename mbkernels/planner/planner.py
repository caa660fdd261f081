"""The planner: visits a model's module tree, offers each parent's children to the fusion kinds (REGISTRY order),
and collects the proven swaps (planned Changes); `apply` makes them all or none, `unpatch` undoes them."""
from typing import Optional

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..match.probe import Observation, TensorSpec, observe, probe_call
from ..nn import rewrite
from ..nn.fused import EagerWindow
from ..nn.dwconv import FoldedConvBNAct, FusedInto
from .changes import KEPT_STOCK, STOCK_SLOTS, Change, get_slot, placed_in, set_slot  # noqa: F401 (tuning's)
from .dataflow import REWRITE_SLOTS, DataflowPass, Rewrite, forward_of
from .kinds import REGISTRY, FLAGS, BlockKind, Candidate, FusionKind, Skip, never_called
from .report import PatchEntry, PatchReport, measurements


class Planner:
    def __init__(self, backend: Optional[str], flags: dict, measured: bool = False):
        self.backend = backend
        self.flags = flags
        self.measured = measured  # a tuned patch: blocks are timed against their layers, not estimated
        self.block_alternatives = []  # kinds.BlockAlternative per block fused by layers for now (timed after)
        self.blocks = flags["blocks"]  # BlockKind's mode: True (measured or cost model) or "all"
        self.kinds = [entry.kind(self) for entry in REGISTRY if flags[entry.flag]]
        self.fused_types = tuple(entry.kind.fused_type for entry in REGISTRY)
        self.report = PatchReport()
        self.swaps = []
        self.generator = torch.Generator().manual_seed(0)
        self.observation = Observation()  # the model's forward on a random image (probe.observe)
        self.observed = {}  # module -> the channels of its input in that forward
        self.dataflow = DataflowPass(self)

    @staticmethod
    def restore(module: nn.Module) -> nn.Module:
        return unpatch(module)

    def observed_call(self, module: nn.Module, tensors: int = 2) -> Optional[tuple]:
        """(args, kwargs) like the call module's forward got in the model's forward, float64 probes for its
        tensors, when it got at least `tensors` tensors (the default: a one-tensor forward is probed on a small
        random plane, cheaper); None otherwise."""
        seen = self.observation.inputs.get(module)
        if seen is None or sum(isinstance(v, TensorSpec) for v in pytree.tree_leaves(seen)) < tensors:
            return None
        return probe_call(seen, self.generator)

    def visit(self, parent: nn.Module, path: str, outer: tuple = ()) -> None:
        """Plan parent's children (path: parent's path with a trailing dot; outer: (path, module) of each module
        parent is inside, the model first: their forwards say how parent is called)."""
        children = list(parent.named_children())
        taken = {name for name, child in children if isinstance(child, FusedInto) or self.record_fused(child, path + name)}
        taken |= self.record_rewrite(parent, path) | self.record_kept_stock(parent, children)
        skipped = {}  # child name -> the skip entries of candidates that child started
        swaps_before, fused_here = len(self.swaps), []
        for kind in self.kinds:
            for candidate in list(kind.candidates(parent, path, children, taken)):
                child = candidate.path[len(path):].partition(".")[0]
                try:
                    taken.update(self.plan(parent, kind, candidate))
                    fused_here.append((child, self.swaps[-1].entries[0]))
                except Skip as skip:
                    entry = PatchEntry(candidate.path, kind.kind, candidate.shape, "", str(skip))
                    self.report.skipped.append(entry)
                    skipped.setdefault(child, []).append(entry)
        here = fused_here + [(child, entry) for child, entries in skipped.items() for entry in entries]
        if not rewrite.rewritten(parent) and KEPT_STOCK not in parent.__dict__ \
                and self.dataflow.leftovers(parent, children, taken, here):
            taken |= self.plan_rewrite(parent, path, outer, swaps_before, skipped, here)
        for name, child in children:
            if name in taken:
                continue
            fused_before, swaps_before = len(self.report.fused), len(self.swaps)
            self.visit(child, f"{path}{name}.", outer + ((path, parent),))
            inside = {entry.kind for entry in self.report.fused[fused_before:]} | {
                entry.kind for swap in self.swaps[swaps_before:] for entry in swap.entries}
            for entry in skipped.get(name, []):
                # A wrapper around a match of its kind inside it (an SE inside a module with the SE's layers), or a
                # block whose layers were fused: the match is inside, the wrapper's refusal is no news. An SE
                # refused (say for its gate) whose 1x1 convs were folded is news.
                if entry.kind in inside or (entry.kind == BlockKind.kind and inside):
                    self.report.skipped.remove(entry)

    def plan_rewrite(self, parent: nn.Module, path: str, outer: tuple, swaps_before: int, skipped: dict,
                     here: list) -> set:
        """Plan a rewrite of parent's forward (the dataflow pass); the child slots it takes. Its matches replace
        the structural swaps and refusals of the children they cover; where there is no rewrite, the entries of
        the children left behind say why."""
        structural = {swap.assignments[0][0]: (not isinstance(swap.holder.bn, nn.Identity),
                                                swap.holder.activation != "identity")
                      for swap in self.swaps[swaps_before:] if isinstance(swap.holder, FoldedConvBNAct)}
        planned = self.dataflow.plan(parent, path, self.dataflow.call_of(path, outer), structural)
        called = self.dataflow.called_children(path)
        for child, entries in skipped.items():
            if called is not None and child not in called:  # a module the forward never calls: nothing runs
                for entry in entries:
                    entry.reason = never_called(parent)
        if not isinstance(planned, Rewrite):
            if planned:  # a forward that cannot be rewritten: what its convs became says why
                where = f"the {forward_of(path)} was not rewritten: {planned}"
                for _, entry in here:
                    if entry.reason:
                        entry.reason += f" ({where})"
                for swap in self.swaps[swaps_before:]:
                    fused = swap.holder
                    if isinstance(fused, FoldedConvBNAct):  # kept by the module: patch_report says it again
                        fused.half_fused += f" ({where})" if fused.half_fused else where
                        swap.entries[0].note = fused.half_fused
            return set()
        covered = {target.partition(".")[0] for target in planned.covered}
        self.swaps[swaps_before:] = [swap for swap in self.swaps[swaps_before:]
                                     if not any(slot.partition(".")[0] in covered for slot, _ in swap.assignments)]
        for child in covered:
            for entry in skipped.pop(child, []):
                self.report.skipped.remove(entry)
        container = planned.container
        container.covered = sorted(covered)
        for fused in container:
            fused.training = parent.training
        entries = [PatchEntry(*entry, via=forward_of(path)) for entry in planned.entries]
        # The forward goes in as a bound method, as rewrite.install puts it.
        self.swaps.append(Change.planned(
            parent, [(rewrite.CONTAINER, container), ("forward", planned.forward.__call__)], REWRITE_SLOTS, entries))
        self.block_alternatives += planned.alternatives
        return covered | {rewrite.CONTAINER}

    def record_rewrite(self, parent: nn.Module, path: str) -> set:
        """The fused modules of a rewritten forward (parent's, at path), in the report; the child slots they
        cover."""
        if not rewrite.rewritten(parent):
            return set()
        container = getattr(parent, rewrite.CONTAINER)
        for fused in (m for m in container if "specialises" not in m.__dict__):  # one entry per match
            kind = next(kind for kind in self.kinds if type(fused) is kind.fused_type)
            self.report.fused.append(PatchEntry(
                fused.dataflow_path, kind.kind, *kind.describe(fused), measured=measurements(fused),
                via=forward_of(path)))
        return set(container.covered) | {rewrite.CONTAINER}

    def record_kept_stock(self, parent: nn.Module, children: list) -> set:
        """What a tuned patch kept stock among parent's children (and in parent's forward), in the report as left
        alone with the measurement; the child slots it holds."""
        notes = [(name, child.__dict__[KEPT_STOCK]) for name, child in children if KEPT_STOCK in child.__dict__]
        if KEPT_STOCK in parent.__dict__:
            notes.append((None, parent.__dict__[KEPT_STOCK]))
        taken = set()
        for name, note in notes:
            taken |= {name} if name is not None else set(note["covered"])
            self.report.skipped += [PatchEntry(*entry, reason=note["reason"]) for entry in note["entries"]]
        return taken

    def record_fused(self, module: nn.Module, path: str) -> bool:
        for kind in self.kinds:
            if type(module) is kind.fused_type:  # exactly: MixedDWConvBNAct is a DWConvBNAct of another kind
                self.report.fused.append(PatchEntry(path, kind.kind, *kind.describe(module), note=kind.note(module),
                                                    measured=measurements(module)))
                return True
        return False

    def plan(self, parent: nn.Module, kind: FusionKind, candidate: Candidate) -> list:
        """Build one candidate (proven on a probe) and plan its swap; the slots it takes. Skip when it cannot be
        fused."""
        items = candidate.build()
        fused = items[0][1]
        for _, new, stock in items:
            new.training = stock.training  # new modules start in training mode; take the stock one's
        shape, activation = kind.describe(fused)
        entry = PatchEntry(candidate.path, kind.kind, shape, activation, note=kind.note(fused))
        self.swaps.append(Change.planned(parent, [(slot, new) for slot, new, _ in items],
                                         tuple((slot, stock) for slot, _, stock in items), [entry]))
        return [slot for slot, _, _ in items]


def check_flags(flags: dict) -> dict:
    """patch's keyword flags (one per REGISTRY flag, True by default), checked."""
    unknown = set(flags) - set(FLAGS)
    if unknown:
        raise TypeError(f"unknown keyword {', '.join(sorted(unknown))}; patch takes the flags {', '.join(FLAGS)} "
                        f"(each True by default)")
    flags = {flag: flags.get(flag, True) for flag in FLAGS}
    if flags["blocks"] not in (True, False, "all"):
        raise ValueError(f"blocks must be True, False or 'all', got {flags['blocks']!r}")
    return flags


def _refuse_meta_tensors(model: nn.Module) -> None:
    """Weights on the meta device cannot be folded or checked: say so rather than fuse nothing quietly."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    meta = [name for name, tensor in tensors if tensor.device.type == "meta"]
    if meta:
        raise ValueError(
            f"cannot patch: {len(meta)} parameters/buffers are on the meta device (first: '{meta[0]}'); load the "
            f"weights first (model.to_empty(device=...), then load_state_dict)"
        )


def plan(model: nn.Module, backend: Optional[str], flags: dict, measured: bool = False) -> Planner:
    """Every candidate of the model, matched and proven, as planned swaps and a report (the model unchanged);
    measured: a tuned patch will time the blocks against their layers (see tuning)."""
    _refuse_meta_tensors(model)
    planner = Planner(backend, check_flags(flags), measured)
    planner.observation = observe(model)
    planner.observed = planner.observation.channels
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the probes are tiny: thread start-up would cost more than it saves
    try:
        planner.visit(model, "")
    finally:
        torch.set_num_threads(threads)
    return planner


def apply(model: nn.Module, planner: Planner) -> None:
    """Make every planned swap, or none (a failure half-way undoes those made), then give the model its eager
    window and the report its fused entries in module order."""
    done = []
    try:
        for swap in planner.swaps:
            done.append(swap)
            swap.place()
    except BaseException:
        for swap in reversed(done):
            swap.remove()
        raise
    EagerWindow.attach(model)
    report = planner.report
    report.fused += [entry for swap in planner.swaps for entry in swap.entries]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.fused.sort(key=lambda entry: order.get(entry.path, -1))


def unpatch(model: nn.Module) -> nn.Module:
    """Put back, in place, the stock modules (the very objects) that patch swapped out, and forget what a tuned
    patch kept stock; return the model."""
    EagerWindow.detach(model)
    for module in model.modules():
        module.__dict__.pop(KEPT_STOCK, None)
    for change in placed_in(model):
        change.remove()
    return model
