"""patch_report's answer: what is fused, what patch would fuse, what was left alone and why, each block's plan."""
from dataclasses import dataclass, field

from .kinds import KIND_LABELS
from .timing import significant


@dataclass
class PatchEntry:
    path: str  # the module's path in the model ("features.3.block.1.0")
    kind: str  # a key of KIND_LABELS, e.g. "dwconv_bn_act"
    shape: str  # "C=72 k=5x5 s=2" / "C=72 R=24"
    activation: str  # "hardswish" / "relu -> hardsigmoid"; "" when unknown
    reason: str = ""  # why it was left alone (skipped entries)
    note: str = ""  # fused entries: what runs on its own right after (a half fusion), e.g. an activation
    via: str = ""  # fused in a rewritten forward (the dataflow pass): "forward of <module path>"
    # A tuned patch's measurements: input ("2x16x56x56 float16 channels_last") -> ({variant: median ms}, choice,
    # why: the decision's line, with the numbers it compared)
    measured: dict = field(default_factory=dict)


def describe_input(key: tuple) -> str:
    """A tuning key (shape, strides, dtype, device) in words."""
    shape, strides, dtype, device = key
    layout = ("channels_last" if len(shape) == 4 and strides[1] == 1 and shape[1] > 1 and strides[3] != 1
              else "NCHW" if len(shape) == 4 else "")
    return " ".join(filter(None, ["x".join(map(str, shape)), str(dtype).replace("torch.", ""), layout, str(device)]))


# On a fused module a tuned patch measured: tuning_key -> the decision's line (timing.choose's), beside its
# `tuned` choices and `timings`.
WHY = "_mbkernels_tuning_why"


def measurements(fused) -> dict:
    """PatchEntry.measured of a fused module."""
    why = fused.__dict__.get(WHY, {})
    return {describe_input(key): (fused.timings.get(key, {}), choice, why.get(key, ""))
            for key, choice in fused.tuned.items()}


@dataclass
class PatchReport:
    """fused: fused modules in the model; fusable: matches not swapped yet (patch_report of a stock model);
    skipped: what looked close but was left alone, with the reason; blocks: the planner's decision for each
    inverted-residual block it matched (block or layer fusion, estimated bytes)."""
    fused: list = field(default_factory=list)
    fusable: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    blocks: list = field(default_factory=list)
    whole_model: tuple = ()  # a tuned patch's check of the whole forward: (choice, {variant: median ms}, why)
    proof: str = ""  # what the whole-model proof of patch found (planner.model_proof)

    def count(self, kind: str, status: str = "fused") -> int:
        return sum(entry.kind == kind for entry in getattr(self, status))

    def summary(self) -> str:
        def counts(status):
            return ", ".join(f"{self.count(kind, status)} {label}" for kind, label in KIND_LABELS.items())
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
                lines += table([("module", "kind", "shape", "activation")]
                               + [(e.path, KIND_LABELS[e.kind], e.shape,
                                   e.activation + (f"; half-fused: {e.note}" if e.note else "")) for e in entries])
        measured = [e for e in self.fused if e.measured]
        if measured:
            lines.append("measured (median ms per call; * the choice; why: the comparison that decided it):")
            lines += table([("module", "input", "variants", "why")]
                           + [(e.path, shape, variants_text(timings, choice), why)
                              for e in measured for shape, (timings, choice, why) in e.measured.items()])
        if self.proof:
            lines.append(f"whole-model proof: {self.proof}")
        if self.whole_model:
            choice, timings, why = self.whole_model
            lines.append(f"whole model, on the example inputs (median ms per call; * the choice): "
                         f"{variants_text(timings, choice)}; {why}")
        estimates = {(d.plan, d.reason) for d in self.blocks if not d.reason.startswith("measured")}
        if len(self.blocks) > 1 and len(estimates) == 1 and not any(d.reason.startswith("measured")
                                                                      for d in self.blocks):
            decision = self.blocks[0]  # the cost model's one plan for one reason (a CPU model's): said once
            lines.append(f"block plans: {decision.plan} for all {len(self.blocks)} blocks: {decision.reason}")
        elif self.blocks:
            lines.append("block plans (the cost model's estimate of HBM bytes per input pixel, in float16 on the GPU "
                         "it aims at; or measured):")
            lines += table([("module", "shape", "plan", "block B/px", "layers B/px", "expand work", "why")]
                           + [(d.path, d.shape, d.plan, f"{d.block_bytes:.0f}", f"{d.layer_bytes:.0f}",
                               f"x{d.recompute:.2f}", d.reason) for d in self.blocks])
        if self.skipped:
            lines.append("left alone:")
            lines += table([("module", "kind", "shape", "why")]
                           + [(e.path, KIND_LABELS[e.kind], e.shape, e.reason) for e in self.skipped])
        return "\n".join(lines)


def variants_text(timings: dict, choice: str) -> str:
    """{variant: median ms} in one line, the choice marked *: "stock 1.000  reference 0.5000*"."""
    return "  ".join(f"{name} {'failed' if ms is None else significant(ms)}{'*' if name == choice else ''}"
                     for name, ms in timings.items())


def table(rows) -> list:
    """Rows as aligned text lines (two spaces of indent; the last column is not padded)."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join(str(v).ljust(w) for v, w in zip(row, widths)) + "  " + str(row[-1]) for row in rows]
