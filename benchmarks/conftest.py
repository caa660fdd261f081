"""Benchmark session: the GPU-time clock, one copy-bandwidth measurement, the results file, the time budget.

Environment (and options):
  MBKERNELS_BENCH_QUICK=1        the reduced matrix (benchmarks/cases.py); the --quick option sets it
  MBKERNELS_BENCH_DEADLINE=T     start no case that might not end by time.time() == T (gpu_session.sh sets it)
  MBKERNELS_BENCH_RESUME=1       skip (case, provider) pairs today's results file already holds
  MBKERNELS_BENCH_COMPILE_MODE   force the torch.compile mode of the `compile` providers ("default" for none)
  MBKERNELS_BENCH_RESULTS_DIR    write results somewhere other than benchmarks/results/
  MBKERNELS_TUNING_CACHE         the tuning table of the patched+tuned providers (default: beside the results on
                                 a GPU, <gpu>-<yyyymmdd>-tuning.json; a temporary file on the CPU)
"""
import functools
import os
import tempfile
import time

import pytest
import torch

from benchmarks import results, timing
from benchmarks.cases import ModelCase
from benchmarks.providers import COMPILING_PROVIDERS

HAS_GPU = torch.cuda.is_available()
DEADLINE_ENV = "MBKERNELS_BENCH_DEADLINE"
RESUME_ENV = "MBKERNELS_BENCH_RESUME"
# Seconds a case of this kind may take at most (compilation and autotuning included): it is not started with
# less time left before the deadline, so a run ends between cases rather than killed inside one.
TIME_RESERVE_S = {("layer", False): 5, ("layer", True): 20, ("model", False): 15, ("model", True): 90}


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="the reduced benchmark matrix (MBKERNELS_BENCH_QUICK=1)")


def pytest_configure(config):
    if config.getoption("quick"):
        os.environ["MBKERNELS_BENCH_QUICK"] = "1"  # read when the test modules build their matrices
    if "MBKERNELS_TUNING_CACHE" not in os.environ:
        if HAS_GPU:
            measured = results.results_path(results.environment(torch.device("cuda")))
            os.environ["MBKERNELS_TUNING_CACHE"] = str(measured.with_name(measured.stem + "-tuning.json"))
        else:  # CPU timings say nothing about a GPU: keep them out of the results
            os.environ["MBKERNELS_TUNING_CACHE"] = os.path.join(tempfile.mkdtemp(), "tuning.json")
    # pytest-benchmark times rounds with this clock: GPU time between CUDA events (see benchmarks/timing.py).
    config.option.benchmark_timer = "benchmarks.timing.device_clock"


def _case_and_kind(item):
    """(case, (family, compiles)) of a benchmark item, (None, None) for a plain test."""
    params = getattr(item, "callspec", None) and item.callspec.params
    if not params or "case" not in params:
        return None, None
    case = params["case"]
    return case, ("model" if isinstance(case, ModelCase) else "layer", params["provider"] in COMPILING_PROVIDERS)


def pytest_collection_modifyitems(session, config, items):
    """Plain tests first, then benchmarks: headline configurations before the rest; within each, the providers
    that need no compilation before those that do, and layers (seconds each) before models (up to minutes to
    compile), so that a run cut short by its time budget has measured as many comparisons as it could."""
    def order(item):
        case, kind = _case_and_kind(item)
        if case is None:
            return (0, 0, False, "")
        family, compiles = kind
        return (1, case.priority, compiles, family)  # "layer" < "model"

    items.sort(key=order)


class BenchSession:
    """What the benchmarks of one pytest session share."""

    def __init__(self, config):
        self.device = torch.device("cuda" if HAS_GPU else "cpu")
        self.enabled = not config.getoption("benchmark_disable")
        self.env = results.environment(self.device)

    @functools.cached_property
    def copy_gbps(self) -> float:
        return timing.copy_bandwidth_gbps(self.device)

    @functools.cached_property
    def results(self) -> results.ResultsFile:
        return results.ResultsFile(results.results_path(self.env))

    @property
    def records_results(self) -> bool:
        """Only timed GPU runs write results: CPU timings say nothing about the kernels."""
        return self.enabled and self.device.type == "cuda"

    def skip_if_measured(self, family: str, case: str, provider: str) -> None:
        if os.environ.get(RESUME_ENV, "0") in ("", "0") or not self.records_results:
            return
        previous = self.results.find(family, case, provider)
        if previous is not None and previous.get("status") == "ok":
            pytest.skip(f"{RESUME_ENV}: already measured in {self.results.path.name} ({previous['median_ms']:.4g} ms)")

    def record(self, fields: dict) -> None:
        if self.records_results:
            self.results.add({**fields, **self.env})


_SESSION = pytest.StashKey[BenchSession]()


@pytest.fixture(scope="session")
def bench(request) -> BenchSession:
    session = request.config.stash[_SESSION] = BenchSession(request.config)
    return session


@pytest.fixture(autouse=True)
def _time_budget(request):
    """Skip a benchmark that would start too close to MBKERNELS_BENCH_DEADLINE."""
    deadline = os.environ.get(DEADLINE_ENV)
    case, kind = _case_and_kind(request.node)
    if deadline and case is not None:
        left = float(deadline) - time.time()
        if left < TIME_RESERVE_S[kind]:
            pytest.skip(f"time budget spent ({left:.0f} s left before {DEADLINE_ENV})")


@pytest.fixture(autouse=True)
def _full_float32():
    """float32 means float32: no TF32 in eager convs or matmuls, references included."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bench = config.stash.get(_SESSION, None)
    # the cached properties are in __dict__ once computed: a summary must not measure or open anything
    if bench is not None and bench.records_results and "results" in bench.__dict__:
        terminalreporter.write_line(f"mbkernels benchmark results: {bench.results.path} "
                                    f"({len(bench.results.records)} records); copy bandwidth "
                                    f"{bench.__dict__.get('copy_gbps', float('nan')):.0f} GB/s")
