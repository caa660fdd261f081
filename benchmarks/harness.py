"""What every benchmark case does: build, check against the float64 reference, then (only then) time and record."""
import time
from typing import Callable, Optional

import pytest
import torch

import mbkernels

from . import providers, timing
from .cases import DTYPE_NAMES, compile_mode, layout_name
from .providers import check_output
from .results import timing_fields

NO_GPU = "no CUDA GPU here (pytest benchmarks/ --benchmark-disable runs the CPU smoke cases)"
HAS_GPU_REASON = "a CUDA GPU is here: the GPU matrix measures these cases"


def _gpu_skip_reason(provider: str) -> Optional[str]:
    if not torch.cuda.is_available():
        return NO_GPU
    if provider.startswith("mbkernels-"):
        status = mbkernels.backend_status()[provider.removeprefix("mbkernels-")]
        if not status.available:
            return f"{provider} unavailable: {status.reason}"
    return None


def gpu_params(pairs) -> list:
    """pytest params of (case, provider) pairs that need a GPU, skipped with the reason where they can't run."""
    params = []
    for case, provider in pairs:
        reason = _gpu_skip_reason(provider)
        marks = [pytest.mark.gpu] + ([pytest.mark.skip(reason=reason)] if reason else [])
        params.append(pytest.param(case, provider, id=f"{case.test_id}-{provider}", marks=marks))
    return params


def cpu_params(pairs) -> list:
    """pytest params of the CPU smoke cases, skipped where a GPU runs the real matrix."""
    marks = [pytest.mark.skip(reason=HAS_GPU_REASON)] if torch.cuda.is_available() else []
    return [pytest.param(case, provider, id=f"{case.test_id}-{provider}", marks=marks) for case, provider in pairs]


def case_fields(family: str, case, provider: str) -> dict:
    fields = {
        "family": family,
        "case": case.label,
        "provider": provider,
        "batch": case.batch,
        "dtype": DTYPE_NAMES[case.dtype],
        "layout": layout_name(case.channels_last),
    }
    if provider in ("compile", "patched+compile", "patched+tuned+compile"):
        fields["compile_mode"] = compile_mode(case) or "default"
    elif provider == "compile-reduce-overhead":
        fields["compile_mode"] = "reduce-overhead"
    return fields


def check_then_time(benchmark, bench, fields: dict, build: Callable[[], Callable], inputs: list,
                    reference: Callable[[torch.Tensor], torch.Tensor], tolerance: float) -> Optional[dict]:
    """Build the provider (compiling and autotuning, untimed), check its output on inputs[0] against the float64
    reference, and only if it is right time it over the rotating inputs. A wrong output (status "wrong") or a
    failure to build or run (status "error") is recorded and fails the case. Returns the record's fields with
    the timing, or None when benchmarking is disabled."""
    with torch.no_grad():
        try:
            started = time.perf_counter()
            fn = build()
            fields = {**fields, "setup_s": round(time.perf_counter() - started, 3)}
            expected = reference(inputs[0])
            fields["max_rel_err"] = check_output(fn(inputs[0]), expected, inputs[0], tolerance)
        except Exception as failure:
            status = "wrong" if isinstance(failure, AssertionError) else "error"
            bench.record({**fields, "status": status, "error": f"{type(failure).__name__}: {failure}"[:500]})
            raise
        del expected
        measured = timing.run_benchmark(benchmark, fn, inputs, bench.device)
    if measured is None:
        return None
    stats, iterations = measured
    return {**fields, **timing_fields(stats, iterations), "status": "ok"}


def measure(benchmark, bench, case, stock: torch.nn.Module, fields: dict,
            build: Callable[[torch.nn.Module, torch.Tensor], Callable], tolerance: float,
            derived: Callable[[float], dict]) -> None:
    """One case whole: `stock` on the bench's device in the case's dtype and layout (and in float64 as the
    reference), rotating inputs, then check_then_time of build(module, first input); the record (timing plus
    derived(median ms)) goes to the results file and to pytest-benchmark's extra_info."""
    device = bench.device
    module = providers.on_device(stock, device, case.dtype, case.channels_last)
    reference = providers.on_device(stock, device, torch.float64, channels_last=False)
    inputs = providers.make_inputs(case.input_shape, case.dtype, case.channels_last, device,
                                   timing.buffer_count(case.input_bytes, device))
    timed = check_then_time(benchmark, bench, fields, build=lambda: build(module, inputs[0]), inputs=inputs,
                            reference=lambda x: reference(x.double()), tolerance=tolerance)
    if timed is not None:
        record = {**timed, **derived(timed["median_ms"])}
        benchmark.extra_info.update(record)
        bench.record(record)
