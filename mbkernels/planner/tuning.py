"""Measured plans: `patch(model, example_inputs=...)` times, on the model's own device and at the inputs the model's
forward really gives each fused module, the stock modules against every backend that can run the candidate, and
for each inverted-residual block, block fusion against layer fusion; it keeps the fastest and caches the choice
on disk (mbkernels.planner.cache), so that the next process with that model and device times nothing.

The choices are fixed in the fused modules (FusedModule.tuned: per input signature, the stock modules, a backend,
or for ConvBNAct its folded conv): eager calls, torch.compile, torch.export, AOTInductor and CUDA graphs all run
what was measured, and nothing is timed after patch returns. A fused variant wins only when it beats the stock
modules by more than the measured noise (timing.choose); ties keep stock. Without example inputs, or with
MBKERNELS_TUNE=0, patch plans from its cost model as before.
"""
import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..match.probe import eval_mode
from ..nn.fused import STOCK, EagerWindow, FusedModule
from . import timing
from .cache import TuningCache
from . import cost
from .cost import BlockDecision
from .report import WHY, PatchEntry, describe_input, measurements
from .kinds import BlockAlternative, BlockKind
from .changes import Change
from .examples import Calls, Seen, record_inputs, shapes_of
from .variants import describe, feasible_backends, variants_of

LAYERS = "layers"  # a block's layer fusion (its layers as tuned), the baseline of block fusion
# Per-candidate timing budget (seconds, calibration and rounds; the warm-up aside): MobileNetV3-Large has about 55
# candidates, so a GPU tunes one batch size in a few seconds.
BUDGET_S = {"cuda": 0.05, "cpu": 0.1}
# The whole model's check: its forward as tuned, with every candidate fused (the fastest fused variant where stock
# was kept), and all stock; the budget of that check.
WHOLE_MODEL = ("tuned", "fused", STOCK)
WHOLE_MODEL_BUDGET_S = {"cuda": 0.5, "cpu": 1.5}


@dataclass
class Tuner:
    """One tuning of a patched model."""
    model: nn.Module
    calls: Calls
    cache: TuningCache
    clock: Optional[object] = None  # a timing clock (tests inject one); None: the device's
    timed: int = 0  # candidates timed (the rest came from the cache)
    largest: int = 0  # bytes of the largest activation of the example forwards: the timing inputs' budget is twice
    whole_model: tuple = ()  # (choice, {variant: median ms}, why) of the whole-model check
    changed: bool = False  # whether tuning placed a change (a block) or removed one (stock kept)

    def budget_s(self) -> float:
        return BUDGET_S.get(self.calls.device.type, BUDGET_S["cpu"])

    def inputs_like(self, seen: Seen, largest: int, out_bytes: int) -> list:
        x = torch.empty_strided(seen.meta.shape, seen.meta.stride(), dtype=seen.meta.dtype,
                                device=seen.meta.device)
        cache_bytes = timing.last_level_cache_bytes(x.device)
        resident = timing.is_resident(x.numel() * x.element_size(), out_bytes, cache_bytes)
        return timing.rotation_inputs(x, cache_bytes, 2 * largest, resident)

    def measure(self, signature: dict, variants: dict, seen: Seen, largest: int, baseline: str) -> tuple:
        """(choice, {variant: median ms}, why) from the cache, or timed now and cached."""
        signature = {**signature, "variants": sorted(variants)}
        record = self.cache.get(signature)
        if record is not None and record.get("choice") in variants:
            return record["choice"], record["timings"], record.get("reason", "")
        probe = self.inputs_like(seen, largest, 0)[:1]
        with torch.no_grad():
            out = variants[baseline](probe[0])
        out_bytes = out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 0
        inputs = self.inputs_like(seen, largest, out_bytes)
        with torch.no_grad():
            timings = timing.time_variants(variants, inputs, seen.meta.device, clock=self.clock,
                                           budget_s=self.budget_s(),
                                           settled=lambda so_far: timing.decided(so_far, baseline))
        choice, reason = timing.choose(timings, baseline=baseline)
        medians = {name: (None if t.failed else round(t.median_ms, 6)) for name, t in timings.items()}
        self.cache.put(signature, {"choice": choice, "timings": medians, "reason": reason})
        self.timed += 1
        return choice, medians, reason

    def tune_module(self, fused: FusedModule, seen: list, largest: int) -> None:
        for one in seen:
            x = one.meta
            variants = variants_of(fused, x)
            signature = {"module": describe(fused), "input": [list(x.shape), list(x.stride()), str(x.dtype)]}
            choice, medians, why = self.measure(signature, variants, one, largest, STOCK)
            fused.keep_measured(one.key, choice, medians)
            keep_why(fused, one.key, why)

    def check_whole_model(self, placed: list) -> list:
        """The per-candidate choices hold up in the model's own forward: time it as tuned (the candidates measured
        fastest stock as the stock modules), with every candidate fused, and all stock (the stock model itself), on
        the example calls, and keep the fastest (as tuned unless another is faster by more than the noise); the
        swaps that stand removed (stock) in it. Layers timed alone miss what they do to each other (caches,
        launches, Python between them)."""
        modules = [module for swap in placed for module in swap.fused]
        choices = {"tuned": {m: dict(m.tuned) for m in modules},
                   "fused": {m: {key: choice if choice != STOCK else fastest_fused(m.timings.get(key, {}))
                                 for key, choice in m.tuned.items()} for m in modules},
                   STOCK: {m: dict(m.tuned) for m in modules}}
        tuned_stock = {id(swap) for swap in placed if stock_wins(swap, choices["tuned"])}
        # Each mode's choices with the plans made for them, kept across the switches: a batch of timed calls right
        # after a switch must not pay for making plans again.
        states = {mode: {m: (chosen[m], {}) for m in modules} for mode, chosen in choices.items()}
        current = [None]

        def use(mode: str) -> None:
            if current[0] != mode:
                for swap in placed:
                    stock = mode == STOCK or (mode == "tuned" and id(swap) in tuned_stock)
                    swap.remove() if stock else swap.place()
                    for module in swap.fused:
                        previous = module.exchange_choices(states[mode][module])
                        if current[0] is not None:
                            states[current[0]][module] = previous
                EagerWindow.attach(self.model)
                current[0] = mode

        def forward(mode: str):
            def call(arguments):
                use(mode)
                return self.model(*arguments)
            return call

        signature = {"whole model": [describe(m) + json.dumps(sorted(map(str, c.items())))
                                     for m, c in choices["tuned"].items()],
                     "calls": [shapes_of(call) for call in self.calls.calls]}
        record = self.cache.get(signature) if modules else None
        if modules and (record is None or record.get("choice") not in choices):
            with torch.no_grad():
                timings = timing.time_variants({mode: forward(mode) for mode in choices}, self.calls.calls,
                                               self.calls.device, clock=self.clock,
                                               budget_s=WHOLE_MODEL_BUDGET_S.get(self.calls.device.type, 1.5),
                                               settled=lambda so_far: timing.decided(so_far, "tuned"))
            choice, reason = timing.choose(timings, baseline="tuned")
            medians = {name: (None if t.failed else round(t.median_ms, 6)) for name, t in timings.items()}
            record = {"choice": choice, "timings": medians, "reason": reason}
            self.cache.put(signature, record)
            self.timed += 1
        choice = record["choice"] if record else "tuned"
        use(choice)
        if choice == "fused":  # the stock choices it overrode say so beside their own measurement
            for module in modules:
                for key, was in choices["tuned"][module].items():
                    if was == STOCK and module.tuned.get(key) != STOCK:
                        keep_why(module, key, f"{module.__dict__.get(WHY, {}).get(key, '')}; then fused: the "
                                              f"whole model measured faster with every candidate fused")
        if record:
            self.whole_model = (record["choice"], record["timings"], record["reason"])
        return [swap for swap in placed if choice == STOCK or (choice == "tuned" and id(swap) in tuned_stock)]

    def tune_block(self, alternative: BlockAlternative, seen: list, largest: int) -> Optional[BlockDecision]:
        """Block fusion against layer fusion, summed over the inputs seen; installs the block where it wins."""
        fused, block = alternative.fused, alternative.block
        if not seen:
            return None
        results = []
        with EagerWindow.opened_around(block):
            for one in seen:
                x = one.meta
                variants = {LAYERS: alternative.layers()}
                op, *values = fused.op_call(x)
                for name in feasible_backends(op, tuple(values)):
                    variants[name] = ops.prepare(op, *values, name)
                signature = {"module": describe(fused), "block": True,
                             "layers": [describe(m) + json.dumps(m.tuned.get(one.key)) for m in block.modules()
                                        if isinstance(m, FusedModule)],
                             "input": [list(x.shape), list(x.stride()), str(x.dtype)]}
                results.append((one, *self.measure(signature, variants, one, largest, LAYERS)))
        total = {}
        for _, _, medians, _ in results:
            for name, ms in medians.items():
                total[name] = total.get(name, 0.0) + (ms if ms is not None else float("inf"))
        best = min((name for name in total if name != LAYERS), key=total.get, default=None)
        # Every input must prefer the block: one where its layers are faster keeps them all (a block module
        # cannot run layer fusion for some inputs).
        wins = best is not None and all(choice != LAYERS for _, choice, _, _ in results)
        estimate = cost.decide(fused, alternative.path, None, every_block=False)  # its bytes, for the report
        decisions = "; ".join(f"at {describe_input(one.key)}: {why}" if len(results) > 1 else why
                              for one, _, _, why in results)
        if not wins:
            return dataclasses.replace(estimate, plan="layers", reason=f"measured: {decisions}")
        for one, choice, medians, why in results:
            fused.keep_measured(one.key, choice if choice != LAYERS else best, medians)
            keep_why(fused, one.key, why)
        return dataclasses.replace(estimate, plan="block", reason=f"measured: {decisions}")


def fused_modules(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, FusedModule)]


def tune(model: nn.Module, planner, calls: Calls, clock=None) -> Tuner:
    """Measure the applied plan's choices on the example calls (layers first, then each block against its
    layers), install the blocks that win, check the choices in the whole model's forward (putting the stock modules
    back where stock won), cache what was measured, and make the planner's report say what was decided."""
    tuner = Tuner(model, calls, TuningCache.load(calls.device), clock)
    alternatives = planner.block_alternatives
    layers = fused_modules(model)
    seen, largest = record_inputs(model, layers + [a.block for a in alternatives], calls)
    tuner.largest = largest
    placed = list(planner.swaps)
    report = planner.report
    paths = {module: name for name, module in model.named_modules()}
    with eval_mode(model):
        for fused in layers:
            tuner.tune_module(fused, seen[fused], largest)
        for alternative in alternatives:
            decision = tuner.tune_block(alternative, seen[alternative.block], largest)
            if decision is None:
                continue
            report.blocks.append(decision)
            block_path = paths[alternative.block]
            if decision.plan == "layers":  # one explanation: the measured one
                for entry in report.skipped:
                    if entry.path == block_path and entry.kind == BlockKind.kind:
                        entry.reason = decision.reason
                continue
            inside = set(alternative.block.modules())
            for swap in [p for p in placed if p.parent in inside]:  # the layer fusion inside it goes
                swap.remove()
                placed.remove(swap)
            report.skipped = [e for e in report.skipped if not (e.path == block_path or
                                                                e.path.startswith(f"{block_path}."))]
            parent, assignments, restore, fused, entries = alternative.swap()
            for module in fused:
                module.training = alternative.block.training
            block_swap = Change.planned(parent, assignments, restore, [PatchEntry(**entry) for entry in entries])
            block_swap.place()
            placed.append(block_swap)
            tuner.changed = True
        kept = tuner.check_whole_model(placed)
        tuner.changed |= bool(kept)
    for swap in kept:
        reason = stock_reason(swap, calls.device, tuner.whole_model if tuner.whole_model and
                              tuner.whole_model[0] == STOCK else None)
        swap.keep_stock(reason)
        report.skipped += [PatchEntry(e.path, e.kind, e.shape, e.activation, reason=reason) for e in swap.entries]
    order = {name: i for i, name in enumerate(paths.values())}
    report.fused = sorted((entry for swap in placed if swap not in kept for entry in swap.entries),
                          key=lambda entry: order.get(entry.path, -1))
    for swap in placed:
        for module, entry in zip(swap.fused, swap.entries):
            entry.measured = measurements(module)
    report.whole_model = tuner.whole_model
    tuner.cache.save()
    return tuner


def stock_wins(swap: Change, choices: dict) -> bool:
    """Whether every measured choice of a change's fused modules is stock (and something was measured)."""
    chosen = [choice for module in swap.fused for choice in choices[module].values()]
    return bool(chosen) and set(chosen) == {STOCK}


def stock_reason(swap: Change, device: torch.device, whole_model: tuple = None) -> str:
    """Why a change stays stock: its own measured decisions, or the whole model's (whole_model: (choice,
    {variant: ms}, why), where the whole stock model was fastest)."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"
    if whole_model:
        why = f"the whole model measured fastest stock ({whole_model[2]})"
    else:
        decisions = [(entry.path, describe_input(key), text.removeprefix(f"{STOCK} kept, "))
                     for module, entry in zip(swap.fused, swap.entries)
                     for key, text in module.__dict__.get(WHY, {}).items()]
        several = len({path for path, _, _ in decisions}) > 1
        why = "; ".join((f"{path} " if several else "") + (f"at {shape}: " if len(decisions) > 1 else "") + text
                        for path, shape, text in decisions)
    return f"kept stock on {where}: {why}"


def keep_why(fused: FusedModule, key: tuple, why: str) -> None:
    """The measured decision's line for inputs of tuning_key `key`, beside FusedModule.tuned (report.WHY)."""
    fused.__dict__.setdefault(WHY, {})[key] = why


def fastest_fused(timings: dict) -> str:
    """The fastest variant other than stock among a candidate's measured ones (stock where none ran)."""
    fused = {name: ms for name, ms in timings.items() if name != STOCK and ms is not None}
    return min(fused, key=fused.get) if fused else STOCK
