"""python -m mbkernels: build a model, patch it (and patch it tuned: each choice timed at the run's input), check the
patched outputs against stock, time them all.

    python -m mbkernels                                  # timm mobilenetv3_large_100 on the GPU (or the CPU)
    python -m mbkernels --model tv:mobilenet_v3_small --dtype float16 --channels-last --batch 128
    python -m mbkernels --size 96 --iters 3 --no-compile # a quick run

Models have random weights with random BatchNorm statistics (nothing is downloaded). The variants are timed in
rounds, each round running every one in turn; each speedup comes with its spread over the rounds, and a line says
when the spread (or the machine's load) makes the ratios unreliable. Exits 1 when a patched output differs from
stock by more than the tolerance, or when compiling the patched model fails; 2 on a bad option value (one line,
before any work).
"""
import argparse
import copy
import logging
import math
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from . import backend_status, backends, patch, patch_report
from .dispatch import why_not_here
from .models import DTYPES, build_model
from .planner import KIND_LABELS
from .planner.cache import cache_path

# Largest max-abs difference to stock, relative to stock's largest logit, that passes the check. Stock and
# patched round at different points (the fused op keeps float32 between conv, BN and activation).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 2e-1}
MAX_LISTED = 5  # modules left alone named in the header
# A ratio whose per-round ratios spread wider than this (half their interquartile range, relative to their median)
# could as well be 1.00x or twice what it says; fewer rounds than MIN_ROUNDS measure no spread.
UNRELIABLE_SPREAD = 0.10
MIN_ROUNDS = 3
# Runnable tasks beyond the cores (1-minute load average) that make the machine too busy to time on.
LOAD_MARGIN = 0.5


def progress(message: str) -> None:
    print(f"[mbkernels] {message}", file=sys.stderr, flush=True)


def not_the_no_gpu_notice(record: logging.LogRecord) -> bool:
    """False for the one line torch logs when torch.compile imports torch.utils.cpp_extension on a machine with a
    CUDA toolkit and no GPU ("No CUDA runtime is found, using CUDA_HOME=..."): there it is expected, and the
    header already says the run is on the CPU. Every other record of that logger passes."""
    return not record.getMessage().startswith("No CUDA runtime is found")


def elapsed_ms(run: Callable, device: torch.device) -> float:
    """Milliseconds of one run(): CUDA events on a GPU, the host clock on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    started = time.perf_counter()
    run()
    return (time.perf_counter() - started) * 1e3


def interleaved_ms(runs: dict, rounds: int, device: torch.device, calls: int = 1) -> dict:
    """{name: [ms per call in each round]}: each round times every run in turn (`calls` calls each), so that the
    machine's other load falls on all of them alike and round i of one is comparable with round i of another."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    def repeated(run: Callable) -> Callable:
        def calls_in_a_row():
            for _ in range(calls):
                run()
        return calls_in_a_row

    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(elapsed_ms(repeated(run), device) / calls)
    return times


def ratio_and_spread(base_ms: list, ms: list) -> tuple[float, Optional[float]]:
    """(median base / median ms: above 1 the second is faster, the spread of the per-round ratios base_i / ms_i:
    half their interquartile range relative to their median; None from fewer than MIN_ROUNDS rounds)."""
    ratio = statistics.median(base_ms) / statistics.median(ms)
    if len(ms) < MIN_ROUNDS:
        return ratio, None
    per_round = [base / this for base, this in zip(base_ms, ms)]
    low, _, high = statistics.quantiles(per_round, n=4, method="inclusive")
    return ratio, (high - low) / 2 / statistics.median(per_round)


def unreliable(spreads: dict, rounds: int) -> Optional[str]:
    """The warning line for ratios that mean little ({label: spread}, from ratio_and_spread), None when they hold:
    too few rounds, a spread beyond UNRELIABLE_SPREAD, or a machine busier than its cores."""
    reasons = []
    if rounds < MIN_ROUNDS:
        reasons.append(f"{rounds} {'round measures' if rounds == 1 else 'rounds measure'} no spread "
                       f"(--iters {MIN_ROUNDS} or more do)")
    wide = [f"{label} ±{spread:.0%}" for label, spread in spreads.items()
            if spread is not None and spread > UNRELIABLE_SPREAD]
    if wide:
        reasons.append(f"the rounds disagree ({', '.join(wide)}; more than ±{UNRELIABLE_SPREAD:.0%})")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores + LOAD_MARGIN:
        reasons.append(f"the machine is busy (load average {load:.1f} on {cores} cores)")
    return "ratios unreliable: " + "; ".join(reasons) if reasons else None


def compare(out: torch.Tensor, stock: torch.Tensor) -> tuple[float, int]:
    """(max |out - stock| / max |stock|, how many rows agree on the top-1 class)."""
    out, stock = out.double().flatten(1), stock.double().flatten(1)
    error = ((out - stock).abs().max() / stock.abs().max().clamp_min(1e-30)).item()
    return error, int((out.argmax(1) == stock.argmax(1)).sum())


class OneLineErrors(argparse.ArgumentParser):
    """argparse's exit status 2 for a bad option value, in one line (its usage block, many lines, is --help's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="python -m mbkernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenetv3_large_100",
                        help="timm or torchvision name; prefix timm: or tv: to choose (default: %(default)s)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when there is a GPU")
    parser.add_argument("--backend", choices=backends.names(),
                        help="backend of the fused modules (default: the best available; on the CPU: reference, "
                             "or triton when TRITON_INTERPRET=1)")
    parser.add_argument("--batch", type=int, help="batch size (default: 64 on a GPU, 2 on the CPU)")
    parser.add_argument("--size", type=int, default=224, help="image height and width (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="dtype of the models and the input (default: %(default)s)")
    parser.add_argument("--channels-last", action="store_true", help="run in channels_last memory format")
    parser.add_argument("--iters", type=int,
                        help="timed rounds, each running every variant once in turn; the medians and the spread of "
                             f"the ratios come from them (default: 50 on a GPU, 5 on the CPU; {MIN_ROUNDS} or more "
                             "measure a spread)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads of torch, pinned for the whole run (default: the cores this process may "
                             "use)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--no-tune", action="store_true",
                        help="skip the tuned rows (patch(model, example_inputs=x): each choice timed at this input)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (default: %(default)s; aot_eager checks tracing only)")
    parser.add_argument("--tolerance", type=float,
                        help="largest relative error that passes (default: 1e-4 float32, 5e-2 float16, 2e-1 bfloat16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the input (default: %(default)s)")
    return parser


def checked_args(parser: argparse.ArgumentParser, argv: Optional[list]) -> argparse.Namespace:
    """The parsed options, each bad value refused in one line with exit status 2 (argparse's convention) before
    anything is built."""
    args = parser.parse_args(argv)
    for name in ("batch", "size", "iters", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.tolerance is not None and not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        parser.error(f"--tolerance must be a finite number >= 0, got {args.tolerance}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.backend is not None and (reason := why_not_here(args.backend, device)) is not None:
        parser.error(f"--backend {args.backend} cannot run on {device.type} here: {reason}")
    if not args.no_compile:
        from torch import _dynamo

        if args.compile_backend not in _dynamo.list_backends(exclude_tags=()):  # debug backends included
            parser.error(f"--compile-backend {args.compile_backend!r}: torch.compile has no such backend "
                         f"(it has {', '.join(_dynamo.list_backends())}, and debug ones such as aot_eager)")
    return args


def main(argv: Optional[list] = None) -> int:
    parser = make_parser()
    args = checked_args(parser, argv)
    has_gpu = torch.cuda.is_available()
    device = torch.device(args.device or ("cuda" if has_gpu else "cpu"))
    on_gpu = device.type == "cuda"
    backend = args.backend
    if backend is None and not on_gpu:
        backend = "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "reference"
    batch = args.batch or (64 if on_gpu else 2)
    rounds = args.iters or (50 if on_gpu else 5)
    warmup = 10 if on_gpu else 1
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    dtype = DTYPES[args.dtype]
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCE[dtype]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    if not has_gpu:
        logging.getLogger("torch.utils.cpp_extension").addFilter(not_the_no_gpu_notice)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    progress(f"building {args.model}")
    try:
        stock = build_model(args.model, args.seed)
    except ValueError as error:  # a model neither timm nor torchvision has
        parser.error(str(error))
    patched = copy.deepcopy(stock)
    progress("patching (each swap is checked on a probe first)")
    patch(patched, backend=backend)
    report = patch_report(patched)
    stock = stock.to(device, dtype, memory_format=memory_format)
    patched = patched.to(device, dtype, memory_format=memory_format)
    x = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed))
    x = x.to(device, dtype).contiguous(memory_format=memory_format)
    models = [("stock", stock), ("patched", patched)]
    if not args.no_tune:
        progress(f"patching tuned: each choice timed on {device} at this input (cached: {cache_path()})")
        tuned = copy.deepcopy(stock)
        started = time.perf_counter()
        patch(tuned, backend=backend, example_inputs=x)
        progress(f"tuned in {time.perf_counter() - started:.1f} s")
        models.append(("tuned", tuned))

    variants = [(f"{name} eager", model) for name, model in models]
    if not args.no_compile:
        variants += [(f"{name} compiled", torch.compile(model, backend=args.compile_backend))
                     for name, model in models]
    checked, failed, failures, reference = {}, {}, [], None
    with torch.inference_mode():
        for label, model in variants:
            progress(f"{label}: {'compiling and ' if 'compiled' in label else ''}checking, warming up")
            try:
                out = model(x)
            except Exception as error:  # a failed compile is reported in its row
                if "compiled" not in label:
                    raise
                failed[label] = f"{type(error).__name__}: {str(error).splitlines()[0]}"[:60]
                continue
            if reference is None:
                reference = out.clone()
            error, agree = compare(out, reference)
            if error > tolerance:
                failures.append(f"{label}: max relative error {error:.2e} > {tolerance:.0e}")
            checked[label] = (error, agree)
            for _ in range(warmup):
                model(x)
        progress(f"timing: {rounds} rounds, each running every variant once in turn, {threads} threads")
        runs = {label: (lambda model=model: model(x)) for label, model in variants if label in checked}
        times = interleaved_ms(runs, rounds, device)

    for name in ("patched", "tuned"):
        if f"{name} compiled" in failed and "stock compiled" not in failed:
            failures.append(f"torch.compile of the {name} model failed where the stock model's worked")
    print(header(args, device, has_gpu, backend, batch, dtype, report, rounds, threads))
    rows = [(label, failed[label]) if label in failed else (label, times[label], *checked[label])
            for label, _ in variants]
    lines, spreads = table(rows, batch)
    print(lines)
    warning = unreliable(spreads, rounds)
    if warning:
        print(warning)
    if failures:
        print("check: FAIL -- " + "; ".join(failures))
        return 1
    print(f"check: PASS (every output within {tolerance:.0e} of stock eager)")
    return 0


def header(args, device, has_gpu, backend, batch, dtype, report, rounds, threads) -> str:
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    elif not has_gpu:
        where += " (no CUDA GPU found: running on the CPU)"
    status = backend_status()
    chosen = backend or "auto"
    if backend is None:
        real = [name for name, state in status.items() if state.available and not state.emulated]
        chosen += f" (available: {', '.join(real)})"
    fused = ", ".join(f"{report.count(kind)} {label}" for kind, label in KIND_LABELS.items())
    layout = "channels_last" if args.channels_last else "NCHW"
    lines = [
        f"model   {args.model}: batch {batch}, 3x{args.size}x{args.size}, {str(dtype).replace('torch.', '')}, {layout}",
        f"device  {where}; backend {chosen}",
    ]
    if backend is not None and status[backend].emulated:
        lines.append(f"note    the {backend} backend is emulated here ({status[backend].reason}): a correctness "
                     "path, its times are no speed claim")
    lines += [
        f"fused   {fused}; left alone: {len(report.skipped)}"
        + "".join(f"\n          {e.path}: {e.reason}" for e in report.skipped[:MAX_LISTED])
        + ("\n          ... (mbkernels.patch_report(model) lists all)" if len(report.skipped) > MAX_LISTED else ""),
        f"timing  {rounds} rounds, every variant once per round in turn; {threads} CPU threads (torch.set_num_threads)",
        "        latency: the median round; speedup: stock eager / variant; spread: half the interquartile range of "
        "its per-round ratios",
    ]
    return "\n".join(lines)


def table(rows, batch) -> tuple[str, dict]:
    """(the table, {label: spread of its speedup}) of rows (label, ms per round, error, agree) or (label, why it
    failed); the first row, stock eager, is the base of the speedups."""
    head = ("variant", "latency ms", "images/s", "speedup", "spread", "max rel err", "top-1 agree")
    lines, spreads = [], {}
    base = rows[0][1]
    for i, row in enumerate(rows):
        if len(row) == 2:
            lines.append((row[0], "failed", "", "", "", row[1], ""))
            continue
        label, times, error, agree = row
        ms = statistics.median(times)
        speedup, spread = ratio_and_spread(base, times)
        if i:
            spreads[label] = spread
        lines.append((label, f"{ms:.2f}", f"{batch / ms * 1e3:.1f}", f"{speedup:.2f}x",
                      f"±{spread:.0%}" if i and spread is not None else "", f"{error:.1e}", f"{agree}/{batch}"))
    widths = [max(len(str(line[i])) for line in [head] + lines) for i in range(len(head))]
    rule = "  ".join("-" * w for w in widths)
    fmt = lambda line: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)  # noqa: E731
                                 for i, (v, w) in enumerate(zip(line, widths)))
    return "\n".join([fmt(head), rule] + [fmt(line) for line in lines] + [rule]), spreads


if __name__ == "__main__":
    sys.exit(main())
