"""How long patch takes on a model whose forward code does the work (efficientnet_pytorch's EfficientNet-B0, whose
forwards the dataflow pass captures and rewrites) against timm's EfficientNet-B0 (patched by structure alone):
the target is at most twice as long. Both on the CPU, float32, reference backend, blocks by the cost model.

    python benchmarks/test_patch_time.py [--rounds 3]
"""
import argparse
import copy
import statistics
import time

import mbkernels
from mbkernels.models import build_model

MODELS = ("timm:efficientnet_b0", "efficientnet_pytorch:efficientnet-b0")
TARGET = 2.0  # efficientnet_pytorch's patch time over timm's, at most


def patch_seconds(name: str, rounds: int) -> float:
    """Median seconds of patch on fresh copies of the model (the first round warms caches and is dropped)."""
    stock = build_model(name)
    times = []
    for _ in range(rounds + 1):
        model = copy.deepcopy(stock)
        started = time.perf_counter()
        mbkernels.patch(model)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def measure(rounds: int) -> dict:
    seconds = {name: patch_seconds(name, rounds) for name in MODELS}
    return {**seconds, "ratio": seconds[MODELS[1]] / seconds[MODELS[0]]}


def test_patch_time(benchmark):
    rounds = 1 if benchmark.disabled else 3
    measured = measure(rounds)
    benchmark.extra_info.update(**measured, target=TARGET, meets_target=measured["ratio"] <= TARGET)
    if not benchmark.disabled:
        benchmark.pedantic(lambda: None, rounds=1)
        assert measured["ratio"] <= TARGET, measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    measured = measure(parser.parse_args().rounds)
    for name in MODELS:
        print(f"{name:40} patch {measured[name]:.2f} s")
    print(f"ratio {measured['ratio']:.2f} (target <= {TARGET})")


if __name__ == "__main__":
    main()
