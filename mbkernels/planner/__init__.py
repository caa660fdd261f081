"""mbkernels.patch(model): swap stock depthwise conv -> BatchNorm -> activation runs, squeeze-excite modules, whole
inverted-residual blocks and the other convs' BatchNorms for the fused modules of mbkernels.nn, in place; unpatch
puts the stock modules back; patch_report says what was (or would be) fused and what was left alone, and why.

    kinds.py     the fusion kinds behind one protocol and the one registry of them (flags, report labels)
    cost.py      the block cost model and its hardware constants (block or layer fusion without measurements)
    planner.py   the visit of the module tree, the swaps (all or none), unpatch
    report.py    PatchReport

Matching is by structure, never by model names (mbkernels.match: layers, se, block, padding):
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
Every swap is proven once, on a probe, before it is made (mbkernels.match.probe): the stock modules in float64
against the fused ones in float32 with the reference backend, with random BatchNorm statistics; a mismatch is
refused and reported. In a parent other than a plain Sequential the whole parent runs, so a forward that does not
apply the BN (or the activation) right after the conv is caught. All swaps are made at the end, all or none. Then the whole patched model is proven against what it computed before
(model_proof.py): a forward that raises or differs has the changes responsible found, rolled back and reported.
"""
import copy
from typing import Optional

from torch import nn

from ..nn.fused import EagerWindow
from . import examples, model_proof, tuning
from .cache import tuning_enabled
from .changes import placed_in
from .cost import BlockDecision
from .kinds import FLAGS, KIND_LABELS, REGISTRY, FusionKind
from .planner import apply, plan, unpatch
from .report import PatchEntry, PatchReport


def patch(model: nn.Module, backend: Optional[str] = None, verbose: bool = False, example_inputs=None,
          **flags) -> nn.Module:
    """Swap, in place, every depthwise conv -> BatchNorm -> activation run for mbkernels.nn.DWConvBNAct, every
    squeeze-excite for mbkernels.nn.SqueezeExcite and every other conv -> BatchNorm -> activation run for
    mbkernels.nn.ConvBNAct; rewrite the forward of modules whose forward code does what their module tree does
    not show (mbkernels.planner.dataflow); return the model.

    backend: the backend the fused modules ask for (None: the best available at each call, or the measured one).
    Each swap is proven on a probe first and refused when it does not match; state_dict keys and values stay those
    of the stock model. Patching a patched model changes nothing. If a swap fails half-way, the model is left as it
    was. verbose: print patch_report's table.
    example_inputs: inputs as the model will run them (device, dtype, memory format, batch): a tensor, a tuple of
    one call's arguments (which may hold tensors in lists and dicts: a detection model's `([image],)`), or a list of
    either (e.g. one per batch size served). Each candidate is then timed, at
    the input its module sees in the model's forward, against the stock modules and every backend that can run it,
    each block against its layers, and the fastest is kept (a fused variant must beat stock by more than the
    measured noise); choices are cached on disk per device and versions (mbkernels.planner.cache:
    MBKERNELS_TUNING_CACHE names the file, MBKERNELS_TUNE=0 turns tuning off). Inputs that cannot be the model's
    raise ValueError before anything is changed or timed.
    Flags (each True by default; False leaves that kind alone):
      dwconv  depthwise conv + BN + activation runs (mbkernels.nn.DWConvBNAct, MixedDWConvBNAct);
      se      squeeze-excite modules (mbkernels.nn.SqueezeExcite);
      blocks  whole inverted-residual blocks (mbkernels.nn.InvertedResidual) where measured (or, without example
              inputs, the planner's cost model: mbkernels.planner.cost) faster than layer fusion; "all" fuses every
              block the Triton kernel accepts, whatever the cost model says (to measure the block kernels);
      convs   the BatchNorm (and the activation) after every other conv (dense, pointwise, grouped) folded into it
              (mbkernels.nn.ConvBNAct): PyTorch's own conv on folded weights, one pass over memory less per layer.
    """
    calls = examples.example_calls(model, example_inputs) if example_inputs is not None else None
    measured = calls is not None and tuning_enabled()
    planner = plan(model, backend, flags, measured)
    proof = None
    if calls is not None:  # example_calls ran them on the model before patch
        proof = model_proof.ModelProof(model, [(call, {}) for call in calls.calls], lambda: stock_copy(model),
                                       calls.outputs)
    elif planner.observation.call is not None:  # the planner's forward on that image was the model before patch
        proof = model_proof.ModelProof(model, [planner.observation.call], lambda: stock_copy(model),
                                       [planner.observation.output])
    apply(model, planner)
    prove_whole_model(model, planner, proof)
    if measured:  # what is timed runs: the proof came first; tuning's blocks and stock choices are proven again
        tuner = tuning.tune(model, planner, calls)  # the report then says what it measured and decided
        if tuner.changed:
            prove_whole_model(model, planner, proof)
    if verbose:
        print(planner.report)
    return model


def stock_copy(model: nn.Module) -> nn.Module:
    """A copy of model with every change patch placed removed (the model itself unchanged)."""
    changes = placed_in(model)
    EagerWindow.detach(model)
    for change in changes:
        change.remove()
    try:
        return copy.deepcopy(model)
    finally:
        for change in changes:
            change.place()
        EagerWindow.attach(model)


def prove_whole_model(model: nn.Module, planner, proof: Optional["model_proof.ModelProof"]) -> None:
    """The whole-model proof (model_proof.py) of the patched model; what it rolls back leaves the planner's swaps
    (tuning does not time it) and moves from the report's fused entries to its left-alone ones with the reason,
    and a note on the stock modules keeps re-patching from trying it again. Then every BatchNorm, depthwise conv
    and SE the patched forward still runs stock is in the report."""
    report = planner.report
    if proof is None:
        report.proof = ("not proven whole: the model's forward runs on no random image; give example_inputs to "
                        "prove it")
        return
    changes = placed_in(model, report)
    with proof.watching(model_proof.stock_kinds(model)):
        removed = model_proof.prove_and_roll_back(proof, changes, model)
    gone = {change.holder for change, _ in removed}
    planner.swaps = [swap for swap in planner.swaps if swap.holder not in gone]
    for change, reason in removed:
        change.keep_stock(f"stock kept: {reason} with this swap")
        for entry in change.entries:
            report.fused.remove(entry)
            entry.reason, entry.note, entry.measured = f"stock kept: {reason} with this swap", "", {}
            report.skipped.append(entry)
    proof.rolled_back += len(removed)
    report.proof = (f"proven whole on {len(proof.calls)} probe call(s) against the model before patch"
                    + (f"; {proof.rolled_back} changes rolled back ({proof.runs} checks)" if proof.rolled_back
                       else ""))
    report_stock_runs(model, report, proof.ran.values())


def report_stock_runs(model: nn.Module, report: PatchReport, ran) -> None:
    """Left-alone entries for what the patched forward still runs stock (ran: (path, kind) of each) that the
    report does not account for."""
    accounted = [entry.path for entry in report.skipped]
    fused_paths = [path for path, module in model.named_modules() if isinstance(module, tuple(
        entry.kind.fused_type for entry in REGISTRY))]
    for path, kind in ran:
        parent = path.rpartition(".")[0]
        if any(path == seen or path.startswith(seen + ".") or seen.rpartition(".")[0] == parent
               for seen in accounted):
            continue
        inside = next((fused for fused in fused_paths if path.startswith(fused + ".")), None)
        reason = (f"runs stock inside {inside}: its fused op declined the probe input" if inside else
                  "runs stock in the patched forward: no fusion kind matched it")
        report.skipped.append(PatchEntry(path, kind, "", "", reason))


def patch_report(model: nn.Module, backend: Optional[str] = None, **flags) -> PatchReport:
    """What is fused in model, what patch would fuse (fusable), what was left alone and why, and each block's
    plan (block or layer fusion, estimated bytes). Changes nothing."""
    planner = plan(model, backend, flags)
    planner.report.fusable = [entry for swap in planner.swaps for entry in swap.entries]
    if planner.observation.call is not None and placed_in(model):
        report_stock_runs(model, planner.report, model_proof.stock_runs(model, planner.observation.call))
    return planner.report


__all__ = ["BlockDecision", "FLAGS", "FusionKind", "KIND_LABELS", "PatchEntry", "PatchReport", "REGISTRY", "patch",
           "patch_report", "unpatch"]
