"""What a tuned patch costs: for each model and batch, the seconds `patch(model, example_inputs=x)` spends timing
(after planning) and the extra device memory it takes at its peak, beside the largest activation of the model's
forward (the timing inputs' budget is twice that). The choices go to the tuning table the environment names
(MBKERNELS_TUNING_CACHE; the GPU session puts it beside the benchmark results).

    python -m benchmarks.tune_models [--models NAME ...] [--batches 1 32 256] [--dtype float16] [--channels-last]
                                     [--size 224] [--threads N] [--output FILE.json]

Prints one line per (model, batch) and writes the records as a JSON list to --output. Run it twice with the same
table (MBKERNELS_TUNING_CACHE) to see what a warm table costs: the second run times nothing.
"""
import argparse
import copy
import json
import time

import torch

from mbkernels.models import DTYPES, build_model
from mbkernels.planner import examples, planner, tuning
from mbkernels.planner.cache import cache_path

from .cases import MODELS


def tuning_cost(model_name: str, batch: int, dtype: torch.dtype, channels_last: bool, device: torch.device,
                size: int = 224) -> dict:
    """One tuned patch of model_name at this input, measured: tuning seconds, candidates timed and from the
    cache, extra peak memory (GPU), the largest activation."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(model_name).to(device, dtype, memory_format=layout)
    x = torch.randn(batch, 3, size, size, device=device).to(dtype).contiguous(memory_format=layout)
    model = copy.deepcopy(model)
    calls = examples.example_calls(model, x)
    plan_started = time.perf_counter()
    planned = planner.plan(model, None, {}, measured=True)
    planner.apply(model, planned)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    tuner = tuning.tune(model, planned, calls)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    record = {"model": model_name, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
              "layout": "channels_last" if channels_last else "NCHW", "device": str(device),
              "plan_s": round(started - plan_started, 3), "tune_s": round(time.perf_counter() - started, 3),
              "timed": tuner.timed, "largest_activation_bytes": tuner.largest}
    if device.type == "cuda":
        record["extra_peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
        record["extra_over_largest"] = round(record["extra_peak_bytes"] / max(tuner.largest, 1), 3)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    parser.add_argument("--dtype", choices=DTYPES, default="float16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own)")
    parser.add_argument("--output")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"tuning table: {cache_path()}; {torch.get_num_threads()} CPU threads", flush=True)
    records = []
    for model_name in options.models:
        for batch in options.batches:
            record = tuning_cost(model_name, batch, DTYPES[options.dtype], options.channels_last, device,
                                 options.size)
            records.append(record)
            memory = (f", extra peak {record['extra_peak_bytes'] / 2**20:.1f} MiB = "
                      f"{record['extra_over_largest']:.2f}x the largest activation" if "extra_peak_bytes" in record
                      else "")
            print(f"{model_name} batch {batch}: tuned in {record['tune_s']:.2f} s ({record['timed']} timed, "
                  f"plan {record['plan_s']:.2f} s){memory}", flush=True)
            if options.output:
                with open(options.output, "w") as file:
                    json.dump(records, file, indent=1)


if __name__ == "__main__":
    main()
