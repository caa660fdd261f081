"""mbkernels.planner.timing: the rounds, the choice, the rotation inputs and the residency rule.

The choice logic runs on a scripted clock (timing.HostClock over simulated seconds that each variant call
advances by its scripted cost), so it is tested exactly, without timing anything real; one test times real
callables on the CPU.
"""
import math
import statistics
import time

import pytest
import torch

from mbkernels.planner import timing
from mbkernels.planner.timing import HostClock, Timing, choose, time_variants


class Simulated:
    """Simulated time: each call of a scripted variant advances it by the variant's cost, times the load (a slow
    drift of the whole machine when `drift` is given: the load alternates every `period_ms` of simulated time)."""

    def __init__(self, round_ms=1.0, drift=0.0, period_ms=7.0):
        self.seconds = 0.0
        self.log = []  # ("call", name, x) and ("wait",) in order
        self.drift, self.period_ms = drift, period_ms
        owner = self

        class LoggingClock(HostClock):
            def wait(self, mark):
                owner.log.append(("wait",))

        self.clock = LoggingClock(now=lambda: self.seconds, round_ms=round_ms)

    def load(self) -> float:
        return 1 + self.drift * (math.floor(self.seconds * 1e3 / self.period_ms) % 2)

    def variant(self, name, cost_ms, fail_after=None):
        calls = 0

        def call(x):
            nonlocal calls
            calls += 1
            if fail_after is not None and calls > fail_after:
                raise RuntimeError(f"{name} cannot run this")
            self.log.append(("call", name, x))
            self.seconds += cost_ms * self.load() / 1e3

        return call

    def time(self, costs, inputs=None, **kwargs):
        variants = {name: self.variant(name, cost) if not callable(cost) else cost for name, cost in costs.items()}
        return time_variants(variants, inputs or [torch.ones(1)], "cpu", clock=self.clock, **kwargs)


def test_a_faster_variant_is_chosen_with_its_numbers():
    timings = Simulated().time({"stock": 1.0, "cuda": 0.8, "triton": 0.5})
    assert timings["triton"].median_ms == pytest.approx(0.5)
    assert timings["stock"].median_ms == pytest.approx(1.0)
    name, reason = choose(timings)
    assert name == "triton"
    assert reason == ("triton chosen, faster beyond the spread and the 2% floor: triton 0.5000 ms vs stock 1.000 ms: "
                      "50.0% faster (round by round 50.0% faster, spread 0.0% over 15 rounds)")


def test_a_slower_variant_is_refused():
    name, reason = choose(Simulated().time({"stock": 1.0, "triton": 1.5}))
    assert name == "stock"
    assert reason.startswith("stock kept, not faster: triton 1.500 ms vs stock 1.000 ms: 50.0% slower")


@pytest.mark.parametrize("cost", [1.0, 0.99], ids=["tie", "below-the-floor"])
def test_ties_and_gains_below_the_floor_keep_the_baseline(cost):
    timings = Simulated().time({"stock": 1.0, "triton": cost})
    assert timings["stock"].noise < 1e-9 and timings["triton"].noise < 1e-9  # the scripted clock has no noise
    assert choose(timings, min_gain=0.02)[0] == "stock"
    if cost < 1:
        assert choose(timings, min_gain=0.005)[0] == "triton"


def test_gains_within_the_noise_keep_the_baseline():
    def timed(name, rounds):
        return Timing(name, statistics.median(rounds), tuple(rounds), 10, 0.0)

    stock = timed("stock", [1.0, 1.0, 1.0, 1.0])
    # Round by round 7% faster, 3% slower, 10% and 0%: a median gain of 3.5% within a spread of 8.5%.
    within = {"stock": stock, "triton": timed("triton", [0.93, 1.03, 0.90, 1.0])}
    name, reason = choose(within)
    assert name == "stock" and reason == ("stock kept, the gain is within the spread: triton 0.9650 ms vs stock "
                                          "1.000 ms: 3.5% faster (round by round 3.5% faster, spread 8.5% over 4 "
                                          "rounds)")
    beyond = {"stock": stock, "triton": timed("triton", [0.90, 0.91, 0.89, 0.90])}
    assert choose(beyond)[0] == "triton"
    # The steadier of two fast variants wins where only it is beyond its noise.
    steady = {"stock": stock, "cuda": timed("cuda", [0.5, 1.2, 0.6, 1.1]), "triton": timed("triton", [0.88] * 4)}
    assert choose(steady)[0] == "triton"


def test_a_drifting_machine_is_compared_round_by_round():
    """Load that alternates between 1x and 1.5x: each variant's rounds spread, but the rounds interleave the
    variants, so the ratios within a round hold the 5% gain and it is taken, as on a steady machine; noise that
    hits calls at random within a round hides it."""
    drifting = Simulated(drift=0.5).time({"stock": 0.05, "triton": 0.0475}, rounds=20)
    assert drifting["stock"].noise > 0.1 and drifting["triton"].noise > 0.1
    assert choose(drifting)[0] == "triton"
    steady = Simulated().time({"stock": 0.05, "triton": 0.0475}, rounds=20)
    assert choose(steady)[0] == "triton"
    jitter = iter([1.0, 1.3, 0.8, 1.2, 0.9, 1.25, 0.75] * 1000)
    noisy = {name: Timing(name, 1.0, tuple(cost * next(jitter) for _ in range(9)), 10, 0.3)
             for name, cost in (("stock", 1.0), ("triton", 0.95))}
    assert choose(noisy)[0] == "stock"


# 300 calls: past the warm-up (3) and the calibration (1 + 2 + ... + 128), in the first round (100 calls).
@pytest.mark.parametrize("fail_after", [0, 300], ids=["in-warm-up", "in-the-rounds"])
def test_a_failing_variant_is_reported_and_never_chosen(fail_after):
    sim = Simulated()
    timings = sim.time({"stock": 1.0, "broken": sim.variant("broken", 0.01, fail_after=fail_after),
                        "triton": 0.9})
    assert sum(entry[1:2] == ("broken",) for entry in sim.log) == fail_after
    assert len(timings["stock"].rounds_ms) == len(timings["triton"].rounds_ms) == 15
    broken = timings["broken"]
    assert broken.failed and broken.error == "RuntimeError: broken cannot run this"
    assert math.isnan(broken.median_ms) and broken.rounds_ms == ()
    assert broken.as_dict() == {"error": broken.error}
    name, reason = choose(timings)
    assert name == "triton" and "(broken failed)" in reason
    alone = {"stock": timings["stock"], "broken": broken}
    assert choose(alone) == ("stock", "stock kept: no other variant ran (broken failed)")


def test_rounds_interleave_the_variants_and_wait_once_each():
    sim = Simulated()
    inputs = [torch.full((1,), float(i + 1)) for i in range(5)]
    names = ["stock", "triton", "cuda"]
    timings = sim.time({"stock": 0.3, "triton": 0.2, "cuda": 0.25}, inputs=inputs, rounds=7)
    rounds = len(timings["stock"].rounds_ms)
    assert rounds == 7 and all(len(timings[n].rounds_ms) == rounds for n in names)
    # The rounds are the end of the log: in round r the batches run from the r-th variant on, then one wait.
    tail = rounds * (sum(timings[n].calls_per_round for n in names) + 1)
    expected = []
    for r in range(rounds):
        for name in names[r % 3:] + names[:r % 3]:
            expected += [name] * timings[name].calls_per_round
        expected.append("wait")
    assert [entry[1] if entry[0] == "call" else "wait" for entry in sim.log[-tail:]] == expected
    # Call i of the whole run, whichever variant makes it, takes inputs[i % 5].
    calls = [entry for entry in sim.log if entry[0] == "call"]
    assert all(x is inputs[i % 5] for i, (_, _, x) in enumerate(calls))


def test_calls_per_round_adapt_to_the_clock_and_the_budget():
    # The fewest calls that last round_ms (costs chosen off the integer ratios, which rounding would blur).
    timings = Simulated(round_ms=1.0).time({"stock": 0.03, "triton": 0.3, "cuda": 3.0})
    assert [timings[n].calls_per_round for n in ("stock", "triton", "cuda")] == [34, 4, 1]
    assert Simulated(round_ms=0.2).time({"stock": 0.03})["stock"].calls_per_round == 7
    # A tight budget: fewer rounds, down to 3, then fewer calls per round; the whole run stays near the budget.
    sim = Simulated(round_ms=1.0)
    start = sim.seconds
    timings = sim.time({"stock": 0.01, "triton": 0.5}, budget_s=0.004, warmup=1)
    assert all(len(t.rounds_ms) == timing.MIN_ROUNDS for t in timings.values())
    assert timings["stock"].calls_per_round < 100 and timings["triton"].calls_per_round == 1
    assert sim.seconds - start < 0.010


def test_rotation_inputs_fill_twice_the_cache_within_the_budget():
    x = torch.randn(2, 8, 5, 7).contiguous(memory_format=torch.channels_last)  # 2240 bytes
    nbytes = x.numel() * x.element_size()
    buffers = timing.rotation_inputs(x, device_cache_bytes=10_000, budget_bytes=10**6, resident=False)
    assert len(buffers) == 2 * 10_000 // nbytes + 1 == 9
    assert len(buffers) * nbytes > 2 * 10_000
    capped = timing.rotation_inputs(x, device_cache_bytes=10_000, budget_bytes=5 * nbytes + 100, resident=False)
    assert len(capped) == 5
    assert len(timing.rotation_inputs(x, 10_000, 10**6, resident=True)) == 1
    assert len(timing.rotation_inputs(x, 10_000, nbytes // 2, resident=False)) == 1  # always one


@pytest.mark.parametrize("make", [
    lambda: torch.randn(3, 6, 5, 7).to(torch.float16).contiguous(memory_format=torch.channels_last),
    lambda: torch.randn(5, 7, 3, 6, dtype=torch.bfloat16).permute(2, 3, 0, 1),  # dense, unusual strides
    lambda: torch.randn(3, 6, 5, 7, dtype=torch.float64),
], ids=["fp16-channels-last", "bf16-permuted", "fp64-nchw"])
def test_rotation_inputs_keep_the_layout_are_fresh_and_never_zero(make):
    x = make()
    rng = torch.get_rng_state()
    buffers = timing.rotation_inputs(x, device_cache_bytes=4 * x.numel() * x.element_size(), budget_bytes=10**6,
                                     resident=False)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random state is untouched
    for buffer in buffers:
        assert (buffer.shape, buffer.stride(), buffer.dtype, buffer.device) == (x.shape, x.stride(), x.dtype,
                                                                                x.device)
        assert bool((buffer != 0).all()) and buffer.data_ptr() != x.data_ptr()
        assert buffer.float().std() > 0.5
    assert not torch.equal(buffers[0], buffers[1])


def test_rotation_inputs_never_hold_an_exact_zero(monkeypatch):
    """normal_ in float16 rounds about one value in 4e7 to zero: those are replaced."""
    monkeypatch.setattr(torch.Tensor, "normal_", lambda self, generator=None: self.fill_(0))
    assert bool((timing.rotation_inputs(torch.ones(4, 3), 0, 10**6, resident=True)[0] != 0).all())


def test_residency_rule_is_input_plus_output_within_half_the_cache():
    assert timing.is_resident(x_bytes=300, out_bytes=200, cache_bytes=1000)
    assert not timing.is_resident(x_bytes=300, out_bytes=201, cache_bytes=1000)
    assert not timing.is_resident(x_bytes=501, out_bytes=0, cache_bytes=1000)


def test_last_level_cache_reads_the_device(monkeypatch):
    class Properties:
        L2_cache_size = 60 * 2**20

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    assert timing.last_level_cache_bytes(torch.device("cuda", 0)) == 60 * 2**20
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: object())  # a torch without the field
    assert timing.last_level_cache_bytes("cuda") == timing.GPU_CACHE_FALLBACK_BYTES
    assert timing.last_level_cache_bytes("cpu") >= 2**20
    monkeypatch.setattr(timing, "_SYSFS_CACHES", "/nonexistent")
    assert timing.last_level_cache_bytes("cpu") == timing.CPU_CACHE_FALLBACK_BYTES


def test_sysfs_cache_sizes_are_parsed(tmp_path, monkeypatch):
    for index, size in enumerate(["48K", "2048K", "32M"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(f"{size}\n")
    monkeypatch.setattr(timing, "_SYSFS_CACHES", str(tmp_path))
    assert timing.last_level_cache_bytes("cpu") == 32 * 2**20


def test_real_cpu_timing_of_trivial_callables_is_plausible():
    x = torch.randn(16)
    timings = time_variants({"stock": lambda x: time.sleep(0.001), "noop": lambda x: x}, [x], "cpu",
                            rounds=5, budget_s=0.2)
    stock, noop = timings["stock"], timings["noop"]
    assert 1.0 <= stock.median_ms < 20.0 and stock.calls_per_round >= 1
    assert 0 < noop.median_ms < 0.05 and noop.calls_per_round > 100
    assert all(len(t.rounds_ms) >= timing.MIN_ROUNDS and math.isfinite(t.noise) for t in timings.values())
    assert choose(timings)[0] == "noop"
    assert choose({"stock": noop, "sleep": stock})[0] == "stock"


def test_calibration_is_spent_from_the_budget():
    """The calibration's batches count against budget_s: the rounds get what it leaves, and the whole run after the
    warm-up stays within the budget."""
    sim = Simulated(round_ms=1.0)
    timings = sim.time({"stock": 0.3, "triton": 0.15}, budget_s=0.02, warmup=1)
    warm_up_s = (0.3 + 0.15) / 1e3
    assert sim.seconds - warm_up_s <= 0.02 + 1e-9
    # Calibration: 1 + 2 + 4 stock calls and 1 + ... + 8 triton calls (4.35 ms); rounds of 2.25 ms in what is left.
    assert all(len(t.rounds_ms) == 6 for t in timings.values())


class Alternating:
    """A variant whose calls cost `costs` ms in turn (one call per round on a clock with a tiny round_ms)."""

    def __init__(self, sim, costs):
        self.sim, self.costs, self.calls = sim, costs, 0

    def __call__(self, x):
        self.sim.seconds += self.costs[self.calls % len(self.costs)] / 1e3
        self.calls += 1


def test_rounds_that_disagree_are_measured_again_while_the_budget_lasts():
    # Round by round 40% faster, then 30% slower: the gain is within the spread, so the choice is undecided.
    sim = Simulated(round_ms=1e-4)
    settled = lambda so_far: timing.decided(so_far, "stock")
    noisy = sim.time({"stock": 1.0, "triton": Alternating(sim, [0.6, 1.3])}, budget_s=1.0, settled=settled)
    assert len(noisy["triton"].rounds_ms) == timing.MAX_ROUNDS
    name, reason = choose(noisy)
    assert name == "stock" and f"over {timing.MAX_ROUNDS} rounds" in reason
    # A clear gain is decided in the planned rounds: none more.
    steady = sim.time({"stock": 1.0, "triton": 0.6}, budget_s=1.0, settled=settled)
    assert len(steady["triton"].rounds_ms) == 15
    # More rounds only while each fits in what the budget leaves (a round of 2.3 ms as calibrated): 15 planned
    # (31.2 ms with the calibration), then 6 more (42.9 ms); the warm-up (1.6 ms) is not counted.
    start = sim.seconds
    tight = sim.time({"stock": 1.0, "triton": Alternating(sim, [0.6, 1.3])}, budget_s=0.045, warmup=1,
                     settled=settled)
    assert len(tight["triton"].rounds_ms) == 21 and sim.seconds - start - 0.0016 <= 0.045


def test_the_gain_printed_is_that_of_the_medians_printed_beside_it():
    """Medians that say 78% faster, rounds that say 10% slower (a variant fast in the rounds where stock was slow):
    the line prints both, each named, and keeps the baseline: the rounds are too noisy to tell."""
    def timed(name, rounds):
        return Timing(name, statistics.median(rounds), tuple(rounds), 10, 0.0)

    timings = {"stock": timed("stock", [1.0, 1.0, 5.0, 5.0, 5.0]), "triton": timed("triton", [1.1, 1.1, 5.5, 0.5, 0.5])}
    name, reason = choose(timings)
    assert name == "stock"
    assert reason == ("stock kept, the rounds are too noisy to tell (a spread over 50%): triton 1.100 ms vs stock "
                      "5.000 ms: 78.0% faster (round by round 10.0% slower, spread 100.0% over 5 rounds)")
    assert not timing.decided(timings, "stock")
    # Slower by both, but as noisy: still undecided (more rounds may tell), and said to be.
    slower = {"stock": timed("stock", [1.0] * 5), "triton": timed("triton", [1.5, 3.0, 0.9, 1.2, 2.0])}
    assert not timing.decided(slower, "stock")
    assert choose(slower) == ("stock", "stock kept, the rounds are too noisy to tell (a spread over 50%): triton "
                                       "1.500 ms vs stock 1.000 ms: 50.0% slower (round by round 50.0% slower, "
                                       "spread 80.0% over 5 rounds)")


def test_a_variant_the_medians_call_slower_is_never_chosen():
    """Round by round 15% faster (the rounds where stock ran slow), by the medians 750% slower: not chosen."""
    def timed(name, rounds):
        return Timing(name, statistics.median(rounds), tuple(rounds), 10, 0.0)

    timings = {"stock": timed("stock", [1.0, 1.0, 10.0, 10.0, 1.0]),
               "triton": timed("triton", [0.8, 0.8, 8.5, 8.5, 9.0])}
    assert choose(timings) == ("stock", "stock kept, the medians and the rounds disagree: triton 8.500 ms vs stock "
                                        "1.000 ms: 750.0% slower (round by round 15.0% faster, spread 5.0% over 5 "
                                        "rounds)")


def test_a_variant_only_the_medians_call_faster_is_not_chosen():
    """By the medians 50% faster (it was fast where stock was slow), round by round 20% faster within a spread of
    30%: the two disagree and the baseline stays."""
    def timed(name, rounds):
        return Timing(name, statistics.median(rounds), tuple(rounds), 10, 0.0)

    timings = {"stock": timed("stock", [1.0] * 4 + [2.0] * 5),
               "triton": timed("triton", [0.95, 0.95, 1.0, 1.0, 1.0, 1.0, 1.3, 1.6, 1.6])}
    assert choose(timings) == ("stock", "stock kept, the medians and the rounds disagree: triton 1.000 ms vs stock "
                                        "2.000 ms: 50.0% faster (round by round 20.0% faster, spread 30.0% over 9 "
                                        "rounds)")
