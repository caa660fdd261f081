"""Load on mbkernels.serve: throughput and client-side p50/p99 latency against replicas and max batch size.

    python -m benchmarks.serve_load --model mobilenetv3_large_100 --replicas 1 2 --max-batch-size 1 8 32 \\
        --requests 2000 --concurrency 64 --json serve_load.json       # deploys each configuration on a local cluster
    python -m benchmarks.serve_load --url http://127.0.0.1:8000 --requests 500 --concurrency 16  # a running server

Bounded: N requests from C client threads per configuration, each with a timeout and a bounded number of retries;
loopback only unless --url names another server. Every request sends the same JPEG (224x224 noise).
"""
import argparse
import io
import json
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from PIL import Image

from mbkernels import serve as mbserve


def test_image() -> bytes:
    pixels = torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, "JPEG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list, fraction: float) -> Optional[float]:
    return mbserve.percentile(sorted(values), fraction)


def mean_batch_size(url: str, replicas: int) -> Optional[float]:
    """The mean batch size formed so far, over the replicas that answer GET /stats (bounded tries)."""
    seen = {}
    for _ in range(10 * replicas):
        status, stats = mbserve.http_request(f"{url}/stats", timeout=30)
        if status == 200:
            seen[stats["replica"]] = stats
        if len(seen) == replicas:
            break
    sizes = [(int(size), count) for stats in seen.values() for size, count in stats["batch_sizes"].items()]
    batches = sum(count for _, count in sizes)
    return sum(size * count for size, count in sizes) / batches if batches else None


def measure(url: str, requests: int, concurrency: int, image: bytes) -> dict:
    """Send `requests` requests from `concurrency` threads; latency per request includes its retries."""
    for _ in range(min(concurrency, 8)):  # warm-up: connections, first batches
        mbserve.classify(url, image, "image/jpeg")
    latencies, failures, lock = [], [], threading.Lock()

    def one(_):
        started = time.perf_counter()
        status, payload, _ = mbserve.classify(url, image, "image/jpeg", attempts=5)
        elapsed_ms = (time.perf_counter() - started) * 1e3
        with lock:
            (latencies.append(elapsed_ms) if status == 200 else failures.append(f"{status}: {payload}"))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall_s = time.perf_counter() - started
    return {
        "requests": requests, "concurrency": concurrency, "ok": len(latencies), "failed": len(failures),
        "first_failure": failures[0] if failures else None, "wall_s": round(wall_s, 3),
        "throughput_rps": round(len(latencies) / wall_s, 2),
        "p50_ms": round(percentile(latencies, 0.50), 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 0.99), 2) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies), 2) if latencies else None,
    }


COLUMNS = {"replicas": "replicas", "max_batch_size": "max batch", "requests": "requests", "concurrency": "clients",
           "ok": "ok", "failed": "failed", "throughput_rps": "req/s", "p50_ms": "p50 ms", "p99_ms": "p99 ms",
           "mean_batch_size": "mean batch"}


def table(rows: list) -> str:
    lines = [tuple(COLUMNS.values())]
    lines += [tuple("" if row.get(key) is None else f"{row[key]:.2f}" if isinstance(row[key], float) else str(row[key])
                    for key in COLUMNS) for row in rows]
    widths = [max(len(text) for text in column) for column in zip(*lines)]
    rule = "  ".join("-" * width for width in widths)
    fmt = lambda line: "  ".join(text.rjust(width) for text, width in zip(line, widths))  # noqa: E731
    return "\n".join([fmt(lines[0]), rule, *map(fmt, lines[1:]), rule])


def parse_args(argv: Optional[list]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="measure this running server instead of deploying configurations")
    parser.add_argument("--model", default="mobilenetv3_large_100")
    parser.add_argument("--checkpoint")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--dtype", choices=mbserve.DTYPES)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1])
    parser.add_argument("--max-batch-size", type=int, nargs="+", default=[32])
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: all)")
    parser.add_argument("--port", type=int, help="port of the deployed configurations (default: a free one)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    return args


def deployed_rows(args: argparse.Namespace, image: bytes) -> list:
    """One row per (replicas, max batch size), each deployed in turn on one local cluster."""
    import ray
    from ray import serve
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
    rows = []
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        for replicas in args.replicas:
            for max_batch_size in args.max_batch_size:
                command_line = ["--model", args.model, "--replicas", str(replicas), "--device", args.device,
                                "--max-batch-size", str(max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
                                "--port", str(args.port or free_port())]
                command_line += ["--checkpoint", args.checkpoint] if args.checkpoint else []
                command_line += ["--dtype", args.dtype] if args.dtype else []
                options = mbserve.resolve_options(mbserve.parse_args(command_line), gpus)
                print(f"[serve_load] deploying {replicas} replica(s), max batch {max_batch_size}", file=sys.stderr)
                mbserve.run_application(options)
                row = {"model": options.model, "device": options.device, "dtype": options.dtype,
                       "replicas": replicas, "max_batch_size": max_batch_size, "batch_wait_ms": args.batch_wait_ms}
                row.update(measure(options.url, args.requests, args.concurrency, image))
                row["mean_batch_size"] = mean_batch_size(options.url, replicas)
                rows.append(row)
                serve.delete(mbserve.APP_NAME)  # the next configuration starts with fresh replicas and stats
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    image = test_image()
    if args.url:
        row = {"url": args.url}
        row.update(measure(args.url.rstrip("/"), args.requests, args.concurrency, image))
        rows = [row]
    else:
        rows = deployed_rows(args, image)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"rows": rows}, out, indent=2)
    return 1 if any(row["failed"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
