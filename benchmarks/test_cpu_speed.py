"""CPU speed of patched and tuned models against stock ones, eager and under torch.compile: patched eager >= stock
eager, patched + torch.compile >= 0.95x stock + torch.compile, and the tuned model (patch with example_inputs: each
choice timed at the input) at least as fast as stock and as the untuned patched one, for timm's MobileNetV3-Large
/-Small, MobileNetV2 and EfficientNet-B0 and efficientnet_pytorch's EfficientNet-B0 (whose forwards the dataflow
pass rewrites) at batch 1 and 8 (224x224, float32, reference backend).

As pytest-benchmark cases (`pytest benchmarks/test_cpu_speed.py`): each (model, batch, eager|compile) case times
the stock, patched and tuned models interleaved, benchmarks the patched one, and records the times, the ratios
(stock / patched, stock / tuned: above 1 the patched model is faster) and their targets in extra_info. In the smoke run
(`--benchmark-disable`) MobileNetV3-Small at batch 1 runs both pairs at 64x64, once each: it checks that the
variants run and match stock; its ratios mean little.

Each ratio comes with its spread over the rounds (half the interquartile range of the per-round ratios); a ratio
whose rounds disagree, or one timed on a machine busier than its cores, is marked unreliable (extra_info's
`unreliable`, the script's warning lines).

As a script, the measurement the report quotes (interleaved rounds, each variant's median, 2 threads):
    python benchmarks/test_cpu_speed.py [--models NAME ...] [--batches 1 8] [--rounds 7] [--threads 2]
"""
import argparse
import copy
import statistics
import time

import torch

import mbkernels
from mbkernels.__main__ import interleaved_ms, ratio_and_spread, unreliable
from mbkernels.models import build_model

MODELS = ("mobilenetv3_large_100", "mobilenetv3_small_100", "mobilenetv2_100", "efficientnet_b0",
          "efficientnet_pytorch:efficientnet-b0")
BATCHES = (1, 8)
TARGET = {"eager": 1.0, "compile": 0.95}  # the patched model's speed relative to stock, at least
TOLERANCE = 1e-4  # float32 against float64 stock, relative to the largest logit
SMOKE_CASE = ("mobilenetv3_small_100", 1)
THREADS = 2  # torch's CPU threads, pinned for every case


def build(model_name: str, variant: str, x: torch.Tensor, seed: int = 0):
    """({"stock", "patched", "tuned"}: model), float64 stock) for the variant ("eager" or "compile"), random
    BatchNorm statistics; the tuned model is patched with x as its example input."""
    stock = build_model(model_name, seed)
    reference = copy.deepcopy(stock).double()
    models = {"stock": stock, "patched": mbkernels.patch(copy.deepcopy(stock)),
              "tuned": mbkernels.patch(copy.deepcopy(stock), example_inputs=x)}
    if variant == "compile":
        models = {name: torch.compile(model) for name, model in models.items()}
    return models, reference


def check(models: dict, reference, x: torch.Tensor) -> None:
    """Every model's output within TOLERANCE of the float64 stock model (this also warms them up)."""
    want = reference(x.double())
    scale = want.abs().max().item()
    for name, model in models.items():
        error = (model(x).double() - want).abs().max().item() / scale
        assert error <= TOLERANCE, f"{name}: relative error {error:.2e} > {TOLERANCE}"


def interleaved_times(models: dict, x: torch.Tensor, rounds: int, iterations: int) -> dict:
    """{name: [ms per call in each round]}: rounds of `iterations` calls, the models taking turns each round, so
    that the machine's other load falls on all of them alike (the main command's timing)."""
    return interleaved_ms({name: (lambda model=model: model(x)) for name, model in models.items()}, rounds,
                          x.device, calls=iterations)


def interleaved_medians(models: dict, x: torch.Tensor, rounds: int, iterations: int) -> dict:
    """Median ms per call of each model, from interleaved_times."""
    times = interleaved_times(models, x, rounds, iterations)
    return {name: statistics.median(values) for name, values in times.items()}


# --------------------------------------------------------------------------------------------- pytest cases
try:
    import pytest
except ImportError:  # the script needs no pytest
    pytest = None

if pytest is not None:
    def _pairs():
        for model_name in MODELS:
            for batch in BATCHES:
                for variant in ("eager", "compile"):
                    yield pytest.param(model_name, batch, variant, id=f"{model_name}-b{batch}-{variant}")

    @pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU cases; benchmarks/test_models.py times GPUs")
    @pytest.mark.parametrize("model_name, batch, variant", list(_pairs()))
    def test_cpu_speed(model_name, batch, variant, benchmark):
        smoke = benchmark.disabled
        if smoke and (model_name, batch) != SMOKE_CASE:
            pytest.skip(f"the smoke run times {SMOKE_CASE} only (a model takes tens of seconds to build and compile "
                        "on 2 cores)")
        size = 64 if smoke else 224
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        threads = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        try:
            models, reference = build(model_name, variant, x)
            with torch.no_grad():
                check(models, reference, x)
                rounds = 1 if smoke else 5
                times = interleaved_times(models, x, rounds=rounds, iterations=1 if smoke else 3)
                benchmark.pedantic(models["patched"], args=(x,), rounds=1 if smoke else 10, iterations=1,
                                   warmup_rounds=0)
        finally:
            torch.set_num_threads(threads)
        ratio, spread = ratio_and_spread(times["stock"], times["patched"])
        tuned_ratio, tuned_spread = ratio_and_spread(times["stock"], times["tuned"])
        medians = {name: statistics.median(values) for name, values in times.items()}
        benchmark.extra_info.update(model=model_name, batch=batch, variant=variant, stock_ms=medians["stock"],
                                    patched_ms=medians["patched"], tuned_ms=medians["tuned"], ratio=ratio,
                                    ratio_spread=spread, tuned_ratio=tuned_ratio, tuned_ratio_spread=tuned_spread,
                                    target=TARGET[variant],
                                    meets_target=ratio >= TARGET[variant] and tuned_ratio >= 1.0,
                                    unreliable=unreliable({"patched": spread, "tuned": tuned_spread}, rounds),
                                    rounds=rounds, threads=THREADS)


# --------------------------------------------------------------------------------------------------- script
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    print(f"torch {torch.__version__}, {options.threads} threads (torch.set_num_threads), "
          f"{options.size}x{options.size}, float32, {options.rounds} interleaved rounds; ms per call (median round), ratio = stock / that model "
          f"± half the interquartile range of its per-round ratios (targets: patched eager >= 1.00, patched compiled "
          f">= 0.95, tuned >= 1.00 and >= patched)")
    cell = f"{'stock':>7} {'patched':>7} {'ratio':>10} {'tuned':>7} {'ratio':>10}"
    print(f"{'':38} {'':5}  {'eager':-^44}   {'compiled':-^44}")
    print(f"{'model':38} {'batch':>5}  {cell}   {cell}")
    warnings = []
    for model_name in options.models:
        for batch in options.batches:
            x = torch.randn(batch, 3, options.size, options.size, generator=torch.Generator().manual_seed(1))
            torch._dynamo.reset()
            models, reference = build(model_name, "eager", x)
            models.update({f"{name} compiled": torch.compile(model) for name, model in list(models.items())})
            iterations = 8 if batch == 1 else 2
            with torch.no_grad():
                check(models, reference, x)
                times = interleaved_times(models, x, options.rounds, iterations)
            cells, spreads = [], {}
            for suffix in ("", " compiled"):
                stock = times["stock" + suffix]
                cell = [f"{statistics.median(stock):7.2f}"]
                for name in ("patched", "tuned"):
                    ratio, spread = ratio_and_spread(stock, times[name + suffix])
                    spreads[name + suffix] = spread
                    shown = f"{ratio:.2f}x" + (f"±{spread:.0%}" if spread is not None else "")
                    cell += [f"{statistics.median(times[name + suffix]):7.2f}", f"{shown:>10}"]
                cells.append(" ".join(cell))
            print(f"{model_name:38} {batch:5d}  {cells[0]}   {cells[1]}", flush=True)
            warning = unreliable(spreads, options.rounds)
            if warning:
                warnings.append(f"{model_name} batch {batch}: {warning}")
    print("\n".join(warnings))


if __name__ == "__main__":
    main()
