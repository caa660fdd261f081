"""python -m mbkernels: build a model, patch it (and patch it tuned: each choice timed at the run's input), check the
patched outputs against stock, time them all.

    python -m mbkernels                                  # timm mobilenetv3_large_100 on the GPU (or the CPU)
    python -m mbkernels --model tv:mobilenet_v3_small --dtype float16 --channels-last --batch 128
    python -m mbkernels --size 96 --iters 3 --no-compile # a quick run

Models have random weights with random BatchNorm statistics (nothing is downloaded). Exits 1 when a patched
output differs from stock by more than the tolerance, or when compiling the patched model fails.
"""
import argparse
import copy
import logging
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from . import backend_status, patch, patch_report
from .models import DTYPES, build_model
from .planner import KIND_LABELS
from .planner.cache import cache_path

# Largest max-abs difference to stock, relative to stock's largest logit, that passes the check. Stock and
# patched round at different points (the fused op keeps float32 between conv, BN and activation).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 2e-1}
MAX_LISTED = 5  # modules left alone named in the header


def progress(message: str) -> None:
    print(f"[mbkernels] {message}", file=sys.stderr, flush=True)


def not_the_no_gpu_notice(record: logging.LogRecord) -> bool:
    """False for the one line torch logs when torch.compile imports torch.utils.cpp_extension on a machine with a
    CUDA toolkit and no GPU ("No CUDA runtime is found, using CUDA_HOME=..."): there it is expected, and the
    header already says the run is on the CPU. Every other record of that logger passes."""
    return not record.getMessage().startswith("No CUDA runtime is found")


def median_ms(run: Callable, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        run()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def compare(out: torch.Tensor, stock: torch.Tensor) -> tuple[float, int]:
    """(max |out - stock| / max |stock|, how many rows agree on the top-1 class)."""
    out, stock = out.double().flatten(1), stock.double().flatten(1)
    error = ((out - stock).abs().max() / stock.abs().max().clamp_min(1e-30)).item()
    return error, int((out.argmax(1) == stock.argmax(1)).sum())


def parse_args(argv: Optional[list]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mbkernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenetv3_large_100",
                        help="timm or torchvision name; prefix timm: or tv: to choose (default: %(default)s)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when there is a GPU)")
    parser.add_argument("--backend", choices=("cuda", "triton", "reference"),
                        help="backend of the fused modules (default: the best available; on the CPU: reference, "
                             "or triton when TRITON_INTERPRET=1)")
    parser.add_argument("--batch", type=int, help="batch size (default: 64 on a GPU, 2 on the CPU)")
    parser.add_argument("--size", type=int, default=224, help="image height and width (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--channels-last", action="store_true", help="run in channels_last memory format")
    parser.add_argument("--iters", type=int, help="timed runs, median reported (default: 50 on a GPU, 5 on the CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--no-tune", action="store_true",
                        help="skip the tuned rows (patch(model, example_inputs=x): each choice timed at this input)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (default: %(default)s; aot_eager checks tracing only)")
    parser.add_argument("--tolerance", type=float,
                        help="largest relative error that passes (default: 1e-4 float32, 5e-2 float16, 2e-1 bfloat16)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    has_gpu = torch.cuda.is_available()
    device = torch.device(args.device or ("cuda" if has_gpu else "cpu"))
    on_gpu = device.type == "cuda"
    if on_gpu and not has_gpu:
        raise SystemExit("--device cuda: no CUDA GPU is available here")
    backend = args.backend
    if backend is None and not on_gpu:
        backend = "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "reference"
    batch = args.batch or (64 if on_gpu else 2)
    iters = args.iters or (50 if on_gpu else 5)
    warmup = 10 if on_gpu else 1
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
    except ValueError as error:  # a model neither timm nor torchvision has: one line, exit 1
        raise SystemExit(f"error: {error}") from None
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
    rows, failures, reference = [], [], None
    with torch.inference_mode():
        for label, model in variants:
            progress(f"{label}: {'compiling and ' if 'compiled' in label else ''}warming up, then {iters} timed runs")
            try:
                out = model(x)
            except Exception as error:  # a failed compile is reported in its row
                if "compiled" not in label:
                    raise
                rows.append((label, "failed", f"{type(error).__name__}: {str(error).splitlines()[0]}"[:60]))
                continue
            if reference is None:
                reference = out.clone()
            ms = median_ms(lambda: model(x), iters, warmup, device)
            error, agree = compare(out, reference)
            if error > tolerance:
                failures.append(f"{label}: max relative error {error:.2e} > {tolerance:.0e}")
            rows.append((label, ms, error, agree))

    failed = {row[0] for row in rows if row[1] == "failed"}
    for name in ("patched", "tuned"):
        if f"{name} compiled" in failed and "stock compiled" not in failed:
            failures.append(f"torch.compile of the {name} model failed where the stock model's worked")
    print(header(args, device, has_gpu, backend, batch, dtype, report))
    print(table(rows, batch, tolerance))
    if failures:
        print("check: FAIL -- " + "; ".join(failures))
        return 1
    print(f"check: PASS (every output within {tolerance:.0e} of stock eager)")
    return 0


def header(args, device, has_gpu, backend, batch, dtype, report) -> str:
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    elif not has_gpu:
        where += " (no CUDA GPU found: running on the CPU)"
    chosen = backend or "auto"
    if backend is None:
        available = [name for name, status in backend_status().items() if status.available]
        chosen += f" (available: {', '.join(available)})"
    fused = ", ".join(f"{report.count(kind)} {label}" for kind, label in KIND_LABELS.items())
    layout = "channels_last" if args.channels_last else "NCHW"
    return "\n".join([
        f"model   {args.model}: batch {batch}, 3x{args.size}x{args.size}, {str(dtype).replace('torch.', '')}, {layout}",
        f"device  {where}; backend {chosen}",
        f"fused   {fused}; left alone: {len(report.skipped)}"
        + "".join(f"\n          {e.path}: {e.reason}" for e in report.skipped[:MAX_LISTED])
        + ("\n          ... (mbkernels.patch_report(model) lists all)" if len(report.skipped) > MAX_LISTED else ""),
    ])


def table(rows, batch, tolerance) -> str:
    head = ("variant", "latency ms", "images/s", "speedup", "max rel err", "top-1 agree")
    lines = []
    base = rows[0][1] if rows and rows[0][1] != "failed" else None
    for row in rows:
        if row[1] == "failed":
            lines.append((row[0], "failed", "", "", row[2], ""))
            continue
        label, ms, error, agree = row
        speedup = f"{base / ms:.2f}x" if base else ""
        lines.append((label, f"{ms:.2f}", f"{batch / ms * 1e3:.1f}", speedup, f"{error:.1e}", f"{agree}/{batch}"))
    widths = [max(len(str(line[i])) for line in [head] + lines) for i in range(len(head))]
    rule = "  ".join("-" * w for w in widths)
    fmt = lambda line: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)  # noqa: E731
                                 for i, (v, w) in enumerate(zip(line, widths)))
    return "\n".join([fmt(head), rule] + [fmt(line) for line in lines] + [rule])


if __name__ == "__main__":
    sys.exit(main())
