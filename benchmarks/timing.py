"""GPU timing: the clock pytest-benchmark reads, rotating input buffers, and the copy-bandwidth floor.

pytest-benchmark times a round as `end - start` of its timer around `iterations` calls. benchmarks/conftest.py
makes that timer `device_clock`, which reads CUDA events, so every round is GPU time between two events
recorded on the stream the work runs on, not host time around asynchronous launches.
"""
import itertools
import math
import time
from typing import Callable, Sequence

import torch

L2_FALLBACK_BYTES = 50 * 2**20  # H100's L2, for a device that does not report its own
ROUND_TARGET_S = 2e-3  # each timed round lasts about this long, so event resolution (~0.5 us) is negligible
MAX_BUFFERS = 1024
ROUNDS = 30  # timed rounds per benchmark: the median and quartiles come from these
WARMUP_ROUNDS = 3

_last_event = None
_seconds = 0.0


def device_clock() -> float:
    """Seconds of GPU time on the current stream (time.perf_counter on a machine without CUDA).

    Each reading records an event and waits for it. Readings accumulate event-to-event intervals in double
    precision: cudaEventElapsedTime returns float32 milliseconds, too coarse over a long session from one origin.
    """
    global _last_event, _seconds
    if not torch.cuda.is_available():
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    event.synchronize()
    if _last_event is not None:
        _seconds += _last_event.elapsed_time(event) / 1e3
    _last_event = event
    return _seconds


def buffer_count(bytes_per_input: int, device: torch.device) -> int:
    """How many input buffers to rotate among so that together they are 3x the L2 cache: no call finds its
    input still cached from the previous one. At least 2, so even huge inputs alternate."""
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or L2_FALLBACK_BYTES
    return max(2, min(MAX_BUFFERS, math.ceil(3 * l2 / max(bytes_per_input, 1))))


def rotating(fn: Callable, inputs: Sequence) -> Callable[[], object]:
    """A no-argument callable that runs fn on the next input each call, round-robin."""
    cycle = itertools.cycle(inputs)
    return lambda: fn(next(cycle))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iterations_per_round(call: Callable[[], object], device: torch.device, probe_calls: int = 8) -> int:
    """Calls per timed round so that a round lasts about ROUND_TARGET_S (estimated from a few untimed calls)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(probe_calls):
        call()
    synchronize(device)
    per_call = (time.perf_counter() - start) / probe_calls
    return max(1, min(10_000, round(ROUND_TARGET_S / max(per_call, 1e-7))))


def copy_bandwidth_gbps(device: torch.device, rounds: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written (median of rounds):
    1 GiB on a GPU, far beyond its L2; 64 MiB on a CPU."""
    nbytes = 2**30 if device.type == "cuda" else 2**26
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    seconds = []
    for _ in range(rounds):
        start = device_clock()
        dst.copy_(src)
        seconds.append(device_clock() - start)
    return 2 * nbytes / sorted(seconds)[len(seconds) // 2] / 1e9

def run_benchmark(benchmark, fn: Callable, inputs: Sequence, device: torch.device):
    """Time fn over rotating inputs with pytest-benchmark (clock: device_clock); (Stats in seconds per call,
    calls per round), or None when benchmarking is disabled and fn ran once."""
    call = rotating(fn, inputs)
    if benchmark.disabled:
        benchmark.pedantic(call)
        return None
    iterations = iterations_per_round(call, device)
    benchmark.pedantic(call, rounds=ROUNDS, iterations=iterations, warmup_rounds=WARMUP_ROUNDS)
    return benchmark.stats.stats, iterations
