"""Results records: the environment they were measured in, where they are written, and the writer.

A GPU run writes benchmarks/results/<gpu>-<yyyymmdd>.json, a JSON list of records. Each record is one
(case, provider) pair; a record of a later run with the same family, case and provider replaces the earlier
one, so a second session on the same day (MBKERNELS_BENCH_RESUME=1) continues the file instead of forking it.
The file is rewritten after every record: a run stopped by its time limit keeps what it measured.
"""
import datetime
import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

RESULTS_DIR = Path(__file__).with_name("results")
RESULTS_DIR_ENV = "MBKERNELS_BENCH_RESULTS_DIR"  # somewhere else (tests write to a temp dir)


def results_dir() -> Path:
    return Path(os.environ.get(RESULTS_DIR_ENV) or RESULTS_DIR)


def slugify(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def environment(device: torch.device) -> dict:
    """The fields every record carries: GPU, versions, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
    }


def results_path(env: dict, directory: Optional[Path] = None) -> Path:
    return (directory or results_dir()) / f"{slugify(env['gpu'])}-{env['date'].replace('-', '')}.json"


def record_key(record: dict) -> tuple:
    return record["family"], record["case"], record["provider"]


class ResultsFile:
    """The records of one results file, kept on disk after every change."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records = json.loads(self.path.read_text()) if self.path.exists() else []

    def find(self, family: str, case: str, provider: str) -> Optional[dict]:
        for record in self.records:
            if record_key(record) == (family, case, provider):
                return record
        return None

    def add(self, record: dict) -> None:
        key = record_key(record)
        self.records = [r for r in self.records if record_key(r) != key] + [record]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.records, indent=1) + "\n")
        partial.replace(self.path)  # atomic: a killed run never leaves half a file


def timing_fields(stats, iterations: int) -> dict:
    """Event-timed statistics of one benchmark (pytest-benchmark's Stats, seconds per call) in milliseconds."""
    return {
        "median_ms": stats.median * 1e3,
        "q1_ms": stats.q1 * 1e3,
        "q3_ms": stats.q3 * 1e3,
        "min_ms": stats.min * 1e3,
        "max_ms": stats.max * 1e3,
        "rounds": stats.rounds,
        "iterations": iterations,
    }


def layer_fields(bytes_moved: int, median_ms: float, copy_gbps: float) -> dict:
    """Achieved bandwidth of a layer: the bytes it must move over its median time."""
    gbps = bytes_moved / (median_ms / 1e3) / 1e9
    return {"bytes": bytes_moved, "gbps": gbps, "frac_of_copy_bw": gbps / copy_gbps, "copy_gbps": copy_gbps}


def model_fields(batch: int, median_ms: float) -> dict:
    return {"images_per_s": batch / (median_ms / 1e3)}
