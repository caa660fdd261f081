"""Timing the variants of one fused candidate on the user's device, and the choice among them.

`time_variants` runs each variant (the stock modules, each backend's fused module) on rotating inputs: a warm-up
(the first calls compile Triton kernels, make plans, allocate), a calibration of the calls per round, then rounds
in which the variants take turns, so that drift (clocks, temperature, other work) hits all of them alike. A round
times a batch of calls together and divides by their count: one reading per batch keeps the clock's resolution
and its own cost out of the per-call time. `choose` keeps the baseline unless a variant beats it by more than the
rounds' spread and a small floor, and says so with the numbers it compared; where the rounds disagree, timing
measures more of them while its budget lasts.

The clock is the device's: CUDA events recorded on the current stream on a GPU (the time the GPU spends, or waits
for launches, between them; one synchronisation per round), time.perf_counter on the CPU. Tests inject a clock.
"""
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

# The shortest batch each clock times well. CUDA events resolve about 0.5 us (cudaEventElapsedTime's documented
# resolution), 0.25% of 0.2 ms; on the CPU, a batch of 1 ms keeps perf_counter's readings and the scheduler's
# hiccups of a few microseconds to well under 1%.
GPU_ROUND_MS = 0.2
CPU_ROUND_MS = 1.0
MAX_CALLS_PER_ROUND = 4096
MIN_ROUNDS = 3  # the fewest rounds a spread (interquartile range) is measured from
MAX_ROUNDS = 45  # the most rounds a variant gets when the planned ones leave its choice undecided
MIN_GAIN = 0.02  # the smallest gain over the baseline that replaces it (a fraction of its time)
# A spread of the per-round ratios beyond which they tell nothing short of a larger gain: a machine too busy to
# time on (a thread descheduled in some rounds and not in others).
TOO_NOISY = 0.5

# When a device does not report its last-level cache: 50 MiB, the L2 of an H100 (NVIDIA's H100 datasheet) on a
# GPU; 32 MiB on a CPU, an assumed L3 of one server socket, used only where Linux's sysfs does not say.
GPU_CACHE_FALLBACK_BYTES = 50 * 2**20
CPU_CACHE_FALLBACK_BYTES = 32 * 2**20
_SYSFS_CACHES = "/sys/devices/system/cpu/cpu0/cache"


class HostClock:
    """Host time from `now` (seconds; time.perf_counter by default). A mark is a reading; nothing to wait for.
    Tests pass a scripted `now` to time variants without running anything real."""

    def __init__(self, now: Callable[[], float] = time.perf_counter, round_ms: float = CPU_ROUND_MS):
        self.now = now
        self.round_ms = round_ms

    def mark(self) -> float:
        return self.now()

    def wait(self, mark: float) -> None:
        pass

    def elapsed_ms(self, start: float, end: float) -> float:
        return (end - start) * 1e3


class CudaClock:
    """CUDA events recorded on the device's current stream: the GPU time between two marks."""

    def __init__(self, device: torch.device, round_ms: float = GPU_ROUND_MS):
        self.device = device
        self.round_ms = round_ms

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait(self, mark: torch.cuda.Event) -> None:
        mark.synchronize()

    def elapsed_ms(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end)


def clock_for(device: torch.device):
    """The clock for `device`: CudaClock on a CUDA device, HostClock (perf_counter) elsewhere."""
    device = torch.device(device)
    return CudaClock(device) if device.type == "cuda" else HostClock()


@dataclass(frozen=True)
class Timing:
    """One variant's measurement: the median of its rounds' milliseconds per call, each round's value, the calls
    per round, and the noise (interquartile range of the rounds over their median). A variant that raised has
    `error` (its exception, as text) and no rounds."""
    name: str
    median_ms: float = math.nan
    rounds_ms: tuple = ()
    calls_per_round: int = 0
    noise: float = math.nan
    error: str = ""

    @property
    def failed(self) -> bool:
        return bool(self.error)

    def as_dict(self) -> dict:
        """A JSON-able summary (for the tuning cache): median_ms, noise, rounds, calls_per_round; error if any."""
        if self.failed:
            return {"error": self.error}
        return {"median_ms": self.median_ms, "noise": self.noise, "rounds": len(self.rounds_ms),
                "calls_per_round": self.calls_per_round}


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def time_variants(variants: Mapping[str, Callable[[Any], Any]], inputs: Sequence[torch.Tensor],
                  device: torch.device, *, clock=None, warmup: int = 3, rounds: int = 15,
                  budget_s: float = 0.25, settled: Optional[Callable[[dict], bool]] = None) -> dict[str, Timing]:
    """{name: Timing} for each variant (an ordered mapping name -> callable(x), already built; the caller runs this
    under torch.no_grad()). Call i, counted over all variants, takes inputs[i % len(inputs)]: each call reads the
    least recently read input, whichever variant ran before it.

    Each variant is warmed up (`warmup` calls), then calibrated: batches of doubling size until one lasts
    clock.round_ms, which sets its calls per round. Then `rounds` rounds; in round r the variants take turns from
    the r-th one on, each timing one batch of its calls, and the round waits once, for all of them. budget_s
    bounds the calibration and rounds together (the warm-up, which may compile kernels, is not counted): fewer
    rounds where they would not fit, down to MIN_ROUNDS, then fewer calls per round. settled: a test of the timings
    so far (e.g. `lambda t: decided(t, "stock")`); while it fails, more rounds are timed, as long as each fits in
    what is left of the budget, up to MAX_ROUNDS. A variant that raises is reported failed (Timing.error) and not
    run again; the others go on."""
    if not inputs:
        raise ValueError("time_variants needs at least one input")
    if rounds < MIN_ROUNDS:
        raise ValueError(f"rounds must be at least {MIN_ROUNDS} (the spread of the rounds is the noise estimate)")
    clock = clock if clock is not None else clock_for(device)
    calls_made = 0

    def batch(fn: Callable, count: int) -> tuple:
        """(start, end) marks around `count` calls of fn (on a GPU, the calls may still be running)."""
        nonlocal calls_made
        start = clock.mark()
        for _ in range(count):
            fn(inputs[calls_made % len(inputs)])
            calls_made += 1
        return start, clock.mark()

    def timed(fn: Callable, count: int) -> float:
        """Milliseconds of `count` calls of fn, waited for."""
        start, end = batch(fn, count)
        clock.wait(end)
        return clock.elapsed_ms(start, end)

    errors = {}
    for name, fn in variants.items():
        try:
            timed(fn, warmup)  # waits: a fault in an asynchronous kernel is this variant's
        except Exception as error:
            errors[name] = _error_text(error)

    spent_ms = 0.0
    per_call_ms = {}
    for name, fn in variants.items():
        if name in errors:
            continue
        count = 1
        try:
            while True:
                elapsed = timed(fn, count)
                spent_ms += elapsed
                if elapsed >= clock.round_ms or count >= MAX_CALLS_PER_ROUND:
                    break
                count = min(2 * count, MAX_CALLS_PER_ROUND)
        except Exception as error:
            errors[name] = _error_text(error)
            continue
        per_call_ms[name] = elapsed / count

    calls = {name: min(MAX_CALLS_PER_ROUND, max(1, math.ceil(clock.round_ms / max(ms, 1e-9))))
             for name, ms in per_call_ms.items()}
    round_ms = sum(calls[name] * per_call_ms[name] for name in calls)
    left_ms = budget_s * 1e3 - spent_ms
    planned = rounds
    if round_ms > 0 and rounds * round_ms > left_ms:
        planned = max(MIN_ROUNDS, min(rounds, math.floor(left_ms / round_ms)))
        if planned * round_ms > left_ms:  # even MIN_ROUNDS do not fit: each variant gets an equal share
            share_ms = max(left_ms, 0.0) / (planned * len(calls))
            calls = {name: max(1, min(count, math.floor(share_ms / max(per_call_ms[name], 1e-9))))
                     for name, count in calls.items()}

    measured = {name: [] for name in calls}
    names = list(calls)

    def one_round(r: int) -> None:
        nonlocal spent_ms
        marks = {}
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name in errors:
                continue
            try:
                marks[name] = batch(variants[name], calls[name])
            except Exception as error:
                errors[name] = _error_text(error)
        if marks:
            clock.wait(list(marks.values())[-1][1])  # one wait per round: the batches queue back to back
        for name, (start, end) in marks.items():
            elapsed = clock.elapsed_ms(start, end)
            spent_ms += elapsed
            measured[name].append(elapsed / calls[name])

    def summary() -> dict[str, Timing]:
        timings = {}
        for name in variants:
            if name in errors:
                timings[name] = Timing(name, error=errors[name])
                continue
            values = measured[name]
            median = statistics.median(values)
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
            timings[name] = Timing(name, median, tuple(values), calls[name],
                                   (q3 - q1) / median if median > 0 else 0.0)
        return timings

    done = 0
    while names and done < planned:
        one_round(done)
        done += 1
        if spent_ms >= budget_s * 1e3 and done >= MIN_ROUNDS:
            break
    # Rounds that disagree: more of them, each only if it fits in what the budget has left.
    round_ms = sum(calls[name] * per_call_ms[name] for name in calls)
    while (settled is not None and names and done < MAX_ROUNDS and spent_ms + round_ms <= budget_s * 1e3
           and not settled(summary())):
        one_round(done)
        done += 1
    return summary()


def paired_ratios(variant: Timing, baseline: Timing) -> list:
    """variant / baseline per round: the rounds interleave the variants, so a drift of the machine (clocks, load)
    hits both sides of each ratio alike and the ratios keep only what differs between them."""
    return [v / b for v, b in zip(variant.rounds_ms, baseline.rounds_ms) if b > 0]


@dataclass(frozen=True)
class Comparison:
    """A variant against the baseline: the gain of the medians (1 - variant median / baseline median), the gain
    round by round (1 - the median of the per-round ratios: drift cancels in each ratio), and the spread of those
    ratios (their interquartile range: the measured noise), over `rounds` paired rounds."""
    name: str
    baseline: str
    median_ms: float
    baseline_ms: float
    gain: float
    paired_gain: float
    spread: float
    rounds: int

    @classmethod
    def of(cls, variant: Timing, baseline: Timing) -> "Comparison":
        gain = 1 - variant.median_ms / baseline.median_ms
        ratios = paired_ratios(variant, baseline)
        if len(ratios) < MIN_ROUNDS:  # a variant that failed part-way: its own spreads stand in
            return cls(variant.name, baseline.name, variant.median_ms, baseline.median_ms, gain, gain,
                       baseline.noise + variant.noise, len(ratios))
        q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        return cls(variant.name, baseline.name, variant.median_ms, baseline.median_ms, gain, 1 - median, q3 - q1,
                   len(ratios))

    def needed(self, min_gain: float) -> float:
        return max(min_gain, self.spread)

    def wins(self, min_gain: float) -> bool:
        """Faster by more than the spread and the floor, by its medians and round by round alike."""
        return min(self.gain, self.paired_gain) > self.needed(min_gain)

    def too_noisy(self) -> bool:
        return self.spread > TOO_NOISY

    def undecided(self, min_gain: float) -> bool:
        """Not a win, though the medians or the rounds say it is faster beyond the floor, or the rounds are too
        noisy to say anything: more rounds may tell."""
        return not self.wins(min_gain) and (max(self.gain, self.paired_gain) > min_gain or self.too_noisy())

    def text(self) -> str:
        """The numbers compared, in words: "reference 0.4195 ms vs stock 12.87 ms: 96.7% faster (round by round
        40.1% faster, spread 95.0% over 3 rounds)"."""
        return (f"{self.name} {_ms(self.median_ms)} vs {self.baseline} {_ms(self.baseline_ms)}: "
                f"{_faster(self.gain)} (round by round {_faster(self.paired_gain)}, spread {self.spread:.1%} over "
                f"{self.rounds} rounds)")


def _ms(ms: float) -> str:
    return f"{significant(ms)} ms"


def significant(value: float, digits: int = 4) -> str:
    """value with `digits` significant digits, trailing zeros kept: 1.000, 12.87, 0.4195, 2006."""
    if value == 0 or not math.isfinite(value):
        return f"{value:.{digits - 1}f}"
    rounded = float(f"{value:.{digits - 1}e}")  # 0.99999 is 1.000, not 1.0000
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(rounded))))
    return f"{rounded:.{decimals}f}"


def _faster(gain: float) -> str:
    """1 - ratio as words: "12.0% faster", "50.0% slower" (the slower variant's extra time), "as fast"."""
    if abs(gain) < 5e-4:
        return "as fast"
    return f"{gain:.1%} faster" if gain > 0 else f"{-gain:.1%} slower"


def comparisons(timings: Mapping[str, Timing], baseline: str) -> dict[str, Comparison]:
    """{name: Comparison} of every variant that ran, other than the baseline (which must have run)."""
    base = timings[baseline]
    return {name: Comparison.of(t, base) for name, t in timings.items() if name != baseline and not t.failed}


def decided(timings: Mapping[str, Timing], baseline: str = "stock", min_gain: float = MIN_GAIN) -> bool:
    """Whether more rounds could not change `choose`'s answer for a reason it can name: a variant wins, or none
    shows a gain beyond the floor on either statistic and every spread is within TOO_NOISY (time_variants'
    `settled`)."""
    if baseline not in timings or timings[baseline].failed:
        return True
    found = comparisons(timings, baseline).values()
    return any(c.wins(min_gain) for c in found) or not any(c.undecided(min_gain) for c in found)


def choose(timings: Mapping[str, Timing], baseline: str = "stock", min_gain: float = MIN_GAIN) -> tuple[str, str]:
    """(name of the variant to use, why, in one line, with the numbers compared). A variant replaces the baseline
    only if it is faster by more than the spread of the comparison (the interquartile range of its per-round time
    ratios to the baseline: the measured noise) and by more than min_gain (a fraction of the baseline's time), both
    by the medians and round by round; among those that are, the fastest wins. Ties, gains within the noise or the
    floor, and failed variants keep the baseline, and the line says which: "stock kept, the medians and the rounds
    disagree: reference 0.4195 ms vs stock 12.87 ms: 96.7% faster (round by round 1.2% faster, spread 95.0% over
    3 rounds)"."""
    if baseline not in timings:
        raise ValueError(f"no baseline {baseline!r} among the timings ({', '.join(timings)})")
    base = timings[baseline]
    ran = {name: t for name, t in timings.items() if not t.failed}
    failed = [name for name, t in timings.items() if t.failed and name != baseline]
    failed_note = f" ({', '.join(failed)} failed)" if failed else ""
    if base.failed:
        if not ran:
            raise ValueError(f"every variant failed; {baseline}: {base.error}")
        best = min(ran, key=lambda name: ran[name].median_ms)
        return best, f"{best} {_ms(ran[best].median_ms)}: the baseline {baseline} failed ({base.error})"
    found = comparisons(timings, baseline)
    if not found:
        return baseline, f"{baseline} kept: no other variant ran{failed_note}"
    winners = [c for c in found.values() if c.wins(min_gain)]
    if winners:
        best = min(winners, key=lambda c: c.median_ms)
        return best.name, (f"{best.name} chosen, faster beyond the spread and the {min_gain:.0%} floor: "
                           f"{best.text()}{failed_note}")
    fastest = min(found.values(), key=lambda c: c.median_ms)
    if fastest.too_noisy():
        verdict = f"the rounds are too noisy to tell (a spread over {TOO_NOISY:.0%})"
    elif fastest.undecided(min_gain):
        verdict = ("the medians and the rounds disagree" if max(fastest.gain, fastest.paired_gain)
                   > fastest.needed(min_gain) else "the gain is within the spread")
    elif max(fastest.gain, fastest.paired_gain) > 0:
        verdict = f"within the {min_gain:.0%} floor"
    else:
        verdict = "not faster"
    return baseline, f"{baseline} kept, {verdict}: {fastest.text()}{failed_note}"


def last_level_cache_bytes(device: torch.device) -> int:
    """The device's last-level cache in bytes: a GPU's L2 (torch's device properties, L2_cache_size), a CPU's
    largest cache as Linux's sysfs reports it for cpu0 (the L3 of its socket, shared by its cores); the
    fallbacks above where neither says."""
    device = torch.device(device)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return int(getattr(properties, "L2_cache_size", 0) or GPU_CACHE_FALLBACK_BYTES)
    return _sysfs_cache_bytes() or CPU_CACHE_FALLBACK_BYTES


def _sysfs_cache_bytes() -> int:
    """The largest cache of cpu0 in /sys/devices/system/cpu/cpu0/cache/index*/size ("491520K"); 0 if unreadable."""
    sizes = []
    try:
        for index in os.listdir(_SYSFS_CACHES):
            if index.startswith("index"):
                with open(os.path.join(_SYSFS_CACHES, index, "size")) as file:
                    text = file.read().strip()
                units = {"K": 2**10, "M": 2**20, "G": 2**30}
                sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    except (OSError, ValueError):
        return 0
    return max(sizes, default=0)


def is_resident(x_bytes: int, out_bytes: int, cache_bytes: int) -> bool:
    """Whether a layer's input is still in the last-level cache when the layer runs inside the model.

    The rule: input + output fit in half the cache. The previous layer has just written the input, so its lines are
    in the cache; this layer then reads them while its output claims lines of its own. While the two together take
    at most half the cache, little of the input is evicted before it is read: the other half leaves room for the
    weights, other traffic, and a replacement policy that is neither LRU nor fully associative (and, on A100 and
    H100, an L2 split into two partitions: NVIDIA's architecture whitepapers). Beyond that, the layer is timed as
    streaming from memory."""
    return x_bytes + out_bytes <= cache_bytes / 2


def rotation_inputs(x: torch.Tensor, device_cache_bytes: int, budget_bytes: int,
                    resident: bool) -> list[torch.Tensor]:
    """Fresh random inputs like x (shape, dtype, device; x's strides where it is dense, else its memory format):
    one when the layer's input is cache-resident in the model, else as many as it takes for their total to exceed
    twice the device's last-level cache, so no call finds its input still cached from an earlier one; at most
    budget_bytes in total (the caller's bound, e.g. twice the model's largest activation), but always one.

    Normal values with exact zeros replaced (zeros would time a special case, and hide unread elements); drawn from
    a private generator, so the caller's random state is untouched."""
    nbytes = max(1, x.numel() * x.element_size())
    count = 1 if resident else 2 * device_cache_bytes // nbytes + 1
    count = max(1, min(count, budget_bytes // nbytes))
    generator = torch.Generator(device=x.device).manual_seed(0)
    buffers = []
    for _ in range(count):
        buffer = torch.empty_like(x, memory_format=torch.preserve_format).normal_(generator=generator)
        buffers.append(buffer.masked_fill_(buffer == 0, 1))
    return buffers
