"""One lifecycle for every change patch makes to a model: planned, placed (the fused modules in their slots),
removed (the stock modules back, the very objects), and kept stock with the reason when it is removed for good.

A change is one parent's slots: a structural swap (the fused module in the first slot, FusedInto placeholders in
the slots of what it folds), a block, or a rewritten forward (its fused list and its `forward`). unpatch, tuning's
stock choices and blocks, and the whole-model proof's rollback all place and remove Changes; each placed change
is found again in the model from the fused module that holds its stock slots (STOCK_SLOTS).
"""
from dataclasses import dataclass
from typing import Optional

from torch import nn

ABSENT = None  # in a change's restore: the slot was empty (a rewrite's forward and fused list)

STOCK_SLOTS = "_mbkernels_stock"  # on each fused module: ((slot name in the parent, stock module), ...)
# On a stock module patch kept stock (a tuned patch measured stock fastest, or the whole-model proof refused the
# swap): {"reason", "entries": the report's (path, kind, shape, activation)}, and for a forward left unrewritten
# "covered": the children its rewrite took. patch leaves it alone and reports it; unpatch clears it.
KEPT_STOCK = "_mbkernels_kept_stock"


def get_slot(parent: nn.Module, slot: str):
    """What a slot of parent holds: a child's name, or a dotted path into a child ("5.0"), or an instance attribute
    (a rewrite's "forward"); ABSENT when it holds nothing."""
    owner, _, name = slot.rpartition(".")
    owner = parent.get_submodule(owner) if owner else parent
    return owner._modules[name] if name in owner._modules else owner.__dict__.get(name, ABSENT)


def set_slot(parent: nn.Module, slot: str, value) -> None:
    """Put value in a slot of parent (ABSENT: empty it)."""
    owner, _, name = slot.rpartition(".")
    owner = parent.get_submodule(owner) if owner else parent
    if value is ABSENT:
        if name in owner._modules or name in owner.__dict__:
            delattr(owner, name)
    else:
        setattr(owner, name, value)


@dataclass(eq=False)
class Change:
    """One change to one parent module: what goes into each slot (assignments) and what the slot held (restore)."""
    parent: nn.Module
    assignments: list  # [(slot, new)], placed in order
    restore: tuple  # ((slot, stock module, or ABSENT for what a rewrite adds), ...)
    entries: list  # the report's PatchEntry of each fused module it puts in

    @property
    def holder(self) -> nn.Module:
        """The module holding STOCK_SLOTS: the fused module, or a rewrite's fused list."""
        return self.assignments[0][1]

    @property
    def fused(self) -> list:
        """The fused modules it puts in (a rewrite's: its list's)."""
        return list(self.holder) if isinstance(self.holder, nn.ModuleList) else [self.holder]

    @property
    def stock(self) -> Optional[nn.Module]:
        """The stock module in its first slot (None for a rewrite: the parent's forward is what it changes)."""
        return next((stock for _, stock in self.restore if stock is not ABSENT), None)

    @classmethod
    def planned(cls, parent: nn.Module, assignments: list, restore: tuple, entries: list) -> "Change":
        """A change not placed yet: its holder learns its stock slots (unpatch and placed_in read them)."""
        object.__setattr__(assignments[0][1], STOCK_SLOTS, tuple(restore))
        return cls(parent, assignments, tuple(restore), entries)

    def place(self) -> None:
        for slot, new in self.assignments:
            set_slot(self.parent, slot, new)

    def remove(self) -> None:
        for slot, stock in self.restore:
            if stock is not ABSENT:
                stock.train(self.holder.training)
            set_slot(self.parent, slot, stock)

    def keep_stock(self, reason: str) -> None:
        """Remove it and leave a note on the stock modules (the parent, for a rewrite) of why they stand: patch and
        patch_report read it, unpatch clears it."""
        self.remove()
        note = {"reason": reason, "entries": [(e.path, e.kind, e.shape, e.activation) for e in self.entries]}
        target = self.stock
        if target is None:
            target = self.parent
            note["covered"] = list(self.holder.covered)
        object.__setattr__(target, KEPT_STOCK, note)


def placed_in(model: nn.Module, report=None) -> list:
    """The changes placed in model now, in module order, each with its entries from report.fused (a PatchReport;
    None: no entries)."""
    changes = []
    paths = {module: path for path, module in model.named_modules()}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            restore = getattr(child, STOCK_SLOTS, None)
            if restore is None:
                continue
            assignments = [(slot, get_slot(parent, slot)) for slot, _ in restore]
            change = Change(parent, assignments, tuple(restore), [])
            if report is not None:
                change.entries = _entries_of(change, paths, report)
            changes.append(change)
    return changes


def _entries_of(change: Change, paths: dict, report) -> list:
    if change.stock is None:  # a rewrite: its fused modules know the paths of the convs they took
        taken = {fused.dataflow_path for fused in change.fused}
        return [entry for entry in report.fused if entry.via and entry.path in taken]
    path = paths.get(change.holder, "")
    return [entry for entry in report.fused if entry.path == path and not entry.via]
