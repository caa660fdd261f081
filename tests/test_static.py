"""benchmarks/static.py (the static sm_90 report) and scripts/gpu_session.sh's dry run, on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report, static

ROOT = Path(__file__).resolve().parents[1]
SASS = """
        /*0080*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0090*/                   LDG.E.128.CONSTANT R8, desc[UR4][R2.64+0x10] ;
        /*00a0*/                   LDG.E.U16 R12, desc[UR4][R6.64] ;
        /*00b0*/                   LDG.E R13, desc[UR4][R6.64] ;
        /*00c0*/                   LDG.E.64 R14, desc[UR4][R6.64] ;
        /*00d0*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*00e0*/                   STL [R1], R4 ;
"""


def test_memory_instructions_counts_loads_and_stores_by_width():
    found = static.memory_instructions(SASS)
    assert found["loads_by_width"] == {"2": 1, "4": 1, "8": 1, "16": 2}
    assert found["stores_by_width"] == {"16": 1}
    assert found["vector_load_fraction"] == 0.4
    assert found["local_instructions"] == 1


@pytest.mark.parametrize("registers, shared, threads, blocks, occupancy", [
    (72, 0, 128, 7, 0.438),       # 72 x 32 = 2304 registers a warp: 28 warps fit
    (32, 0, 128, 16, 1.0),        # the thread limit: 2048 / 128
    (255, 0, 128, 2, 0.125),      # 256-register warps: 8 fit
    (40, 100 * 1024, 64, 2, 0.062),  # shared memory: 228 KB / (100 KB + 1 KB)
])
def test_residency_applies_the_sm90_limits(registers, shared, threads, blocks, occupancy):
    assert static.residency(90, registers, shared, threads) == (blocks, occupancy)


def _record(**changes):
    record = dict(backend="triton", kernel="_dwconv_bn_act_kernel", case="c72", batch=256, dtype="float16",
                  layout="channels_last", channels=72, arch=9.0, registers=64, spill_bytes=0, local_bytes=0,
                  local_instructions=0, vector_load_fraction=1.0, loads_by_width={"16": 11}, bytes=64 * 2**20,
                  occupancy=0.5)
    record.update(changes)
    return record


@pytest.mark.parametrize("changes, gate", [
    (dict(error="CompilationError: tl.dot needs M >= 16"), "compile:"),
    (dict(spill_bytes=624), "spill:"),
    (dict(local_instructions=3), "spill:"),
    (dict(vector_load_fraction=0.5), "vector loads:"),
    (dict(occupancy=0.125), "occupancy:"),
])
def test_each_gate_fails_alone_and_names_its_record(changes, gate):
    assert static.gate_failures([_record()]) == []
    failures = static.gate_failures([_record(**changes)])
    assert len(failures) == 1 and failures[0].startswith(gate) and "c72" in failures[0]


@pytest.mark.parametrize("changes", [
    dict(vector_load_fraction=0.0, dtype="float32", layout="nchw"),  # the 16-byte gate: fp16/bf16 channels_last
    dict(vector_load_fraction=0.0, channels=36),                     # ... with C % 8 == 0 only
    dict(vector_load_fraction=0.0, kernel="_mlp_kernel"),            # ... on the kernels that read x
    dict(occupancy=0.125, bytes=2**20),                              # occupancy: layers moving > 16 MB only
])
def test_gates_apply_where_the_issue_says_only(changes):
    assert static.gate_failures([_record(**changes)]) == []


def test_cuda_backend_is_a_clear_skip_without_the_extension():
    from mbkernels import _native

    if _native.C is not None:
        pytest.skip("the extension is built here")
    records, reason = static.cuda_records(90)
    assert records == [] and "not built" in reason


def test_report_puts_the_floor_beside_the_measured_time():
    case = "dwconv 3x3 s1 c72 56x56 relu, batch 256, float16 channels_last"
    records = [dict(family="layer", op="dwconv_bn_act", case=case, provider=p, median_ms=ms)
               for p, ms in (("eager", 0.5), ("mbkernels-triton", 0.2))]
    table = report.floor_table(records, [dict(case=case, floor_us=100.0), dict(case="other", floor_us=1.0)])
    row = next(line for line in table.splitlines() if line.startswith(f"| {case}"))
    assert "| 100.0 |" in row and "500.0 (5.0x)" in row and "200.0 (2.0x)" in row
    assert "other" not in table


def test_one_layer_compiles_for_sm90_with_16_byte_loads():
    """A real ahead-of-time compile (a fresh process: this one runs Triton under the interpreter) of the launch
    the launcher plans for C = 72 fp16 channels_last, the case that needs the divisibility identities."""
    code = """
import json, os, sys
os.environ["TRITON_INTERPRET"] = "0"
import torch
from benchmarks import static
from benchmarks.shapes import load_shapes
from mbkernels.backends.triton import dwconv
entry = next(e for e in load_shapes()["dwconv_bn_act"] if e["channels"] == 72 and e["kernel"] == [3, 3])
_, label, args, moved = static._dwconv_case(entry, 32, torch.float16, True)
(launch,) = dwconv.plan(args, multiprocessors=static.MULTIPROCESSORS)[1]
print(json.dumps(static.TritonCompiler(90).compile(launch)))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resources = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 < resources["registers"] <= 128 and resources["spill_bytes"] == 0
    assert resources["vector_load_fraction"] >= static.MIN_VECTOR_FRACTION, resources["loads_by_width"]


def test_gpu_session_dry_run_prints_the_plan_in_order_within_8_minutes(tmp_path):
    out = tmp_path / "session"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, DRY_RUN="1", OUT=str(out)))
    assert done.returncode == 0, done.stderr
    steps = [line.split(":")[0].split()[-1] for line in done.stdout.splitlines() if line.startswith("step ")]
    assert steps == ["build", "tests", "layers", "tune", "models", "report"]
    assert "benchmarks.tune_models --batches 1 32 256 --dtype float16 --channels-last" in done.stdout
    assert "benchmarks.static --backend all --arch 9.0 --output" in done.stdout
    assert "MAX_JOBS=16" in done.stdout and "--no-build-isolation --no-deps -e ." in done.stdout
    assert "b256-fp16-cl" in done.stdout and f"--static {out}/static.json" in done.stdout
    fixed = [int(line.split("budget ")[1].split("s")[0]) for line in done.stdout.splitlines()
             if line.startswith("step ") and not line.startswith("step models")]
    assert sum(fixed) < 480
    assert not out.exists()  # a dry run writes nothing


def test_every_record_holds_its_own_launchs_compile_compiled_once(tmp_path):
    """triton_records on a stand-in compile (fast: the launches' real keys, a fake result told apart by the
    kernel's name): each record carries the result of its own launch's kernel, each distinct key is compiled once,
    and a second run reads everything from the cache."""
    code = """
import collections, json, os
os.environ["TRITON_INTERPRET"] = "0"
from benchmarks import static
compiled = collections.Counter()
def fake(self, launch):
    key = self.key(launch)
    compiled[key] += 1
    return dict(registers=32 + len(launch.kernel.__name__), spill_bytes=0, local_bytes=0, shared_bytes=0, threads=128,
                loads_by_width={}, stores_by_width={}, vector_load_fraction=1.0, local_instructions=0)
static.TritonCompiler.compile = fake
records = static.triton_records(90, log=lambda line: None)
again = static.triton_records(90, log=lambda line: None)
print(json.dumps([len(records), len(compiled), max(compiled.values()), again == records,
                  all(r["registers"] == 32 + len(r["kernel"]) for r in records)]))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="0", MBKERNELS_STATIC_CACHE=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    count, distinct, most, same, own = json.loads(done.stdout.strip().splitlines()[-1])
    assert count > distinct > 1 and most == 1 and same and own
