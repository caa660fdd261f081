"""benchmarks/static.py (the sm_90 static report) and scripts/gpu_session.sh's dry run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import static

ROOT = Path(__file__).resolve().parents[1]

SASS = """
        /*0100*/  @P0 LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0110*/  @P1 LDG.E.128.CONSTANT R8, desc[UR4][R2.64+0x10] ;
        /*0120*/  LDG.E.U16 R12, desc[UR4][R6.64] ;
        /*0130*/  LDG.E R13, desc[UR4][R6.64] ;
        /*0140*/  LDG.E.64 R14, desc[UR4][R6.64] ;
        /*0150*/  STG.E.128 desc[UR4][R2.64], R4 ;
        /*0160*/  STL [R1], R4 ;
"""


def test_memory_instructions_counts_loads_and_stores_by_width():
    counted = static.memory_instructions(SASS)
    assert counted["loads_by_width"] == {"2": 1, "4": 1, "8": 1, "16": 2}
    assert counted["stores_by_width"] == {"16": 1}
    assert counted["vector_load_fraction"] == 0.4
    assert counted["local_instructions"] == 1


@pytest.mark.parametrize("registers, shared, threads, blocks, occupancy", [
    (255, 0, 128, 2, 0.125),  # the issue's 255-register kernel: 2 blocks of 4 warps
    (64, 0, 128, 8, 0.5),
    (32, 0, 32, 32, 0.5),  # the 32-blocks-per-SM limit
    (32, 100 * 1024, 256, 2, 0.25),  # shared memory (plus 1 KB reserved per block) limits
])
def test_residency_applies_every_sm90_limit(registers, shared, threads, blocks, occupancy):
    assert static.residency(90, registers, shared, threads) == (blocks, occupancy)


def _record(**changes):
    record = dict(backend="triton", kernel="_dwconv_cl_kernel", case="dw c72", batch=256, dtype="float16",
                  layout="channels_last", channels=72, arch=9.0, registers=64, spill_bytes=0, local_bytes=0,
                  local_instructions=0, shared_bytes=0, vector_load_fraction=1.0, loads_by_width={"16": 10},
                  bytes=2**26, occupancy=0.5)
    record.update(changes)
    return record


@pytest.mark.parametrize("changes, gate", [
    (dict(spill_bytes=624, local_bytes=624), "spill"),
    (dict(vector_load_fraction=0.5), "vector loads"),
    (dict(occupancy=0.125), "occupancy"),
    (dict(error="CompilationError: tl.dot shape"), "compile"),
])
def test_each_gate_fails_by_name(changes, gate):
    assert static.gate_failures([_record()]) == []
    failures = static.gate_failures([_record(**changes)])
    assert len(failures) == 1 and failures[0].startswith(f"{gate}:"), failures


def test_gates_apply_only_where_the_issue_sets_them():
    assert static.gate_failures([
        _record(vector_load_fraction=0.1, channels=100),  # C % 8 != 0: no vector gate
        _record(vector_load_fraction=0.1, dtype="float32", layout="nchw"),
        _record(occupancy=0.125, bytes=2**20),  # a small layer: no occupancy gate
    ]) == []


def test_layer_key_matches_a_benchmark_record():
    entry = {"channels": 72, "height": 56, "width": 56, "kernel": [3, 3], "stride": [1, 1], "padding": [1, 1],
             "dilation": [1, 1], "activation": "relu"}
    static_record = dict(entry, op="dwconv_bn_act", batch=256, dtype="float16", layout="channels_last")
    results_record = dict(entry, op="dwconv_bn_act", batch=256, dtype="float16", layout="channels_last",
                          kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), family="layer")
    assert static.layer_key(static_record) == static.layer_key(results_record)
    assert static.layer_key(static_record) != static.layer_key(dict(results_record, batch=32))


COMPILE_ONE = """
import json, torch
from benchmarks import static
from benchmarks.shapes import load_shapes
from mbkernels.backends.triton import dwconv
entry = next(e for e in load_shapes()["dwconv_bn_act"] if e["channels"] == 72 and e["kernel"] == [5, 5])
_, _, args, _, _ = static._dwconv_case(entry, 256, torch.float16, True)
_, launches = dwconv.plan(args, multiprocessors=static.MULTIPROCESSORS)
print(json.dumps(static.TritonCompiler(90).compile(launches[0])))
"""


def test_a_channels_last_fp16_layer_with_c72_compiles_to_16_byte_loads_without_spills():
    """The kernel the issue found spilling (C = 72 is not a multiple of 16) compiled for sm_90 here."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", COMPILE_ONE], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    resources = json.loads(done.stdout.strip().splitlines()[-1])
    assert resources["spill_bytes"] == 0 and resources["local_bytes"] == 0
    assert resources["vector_load_fraction"] >= static.MIN_VECTOR_FRACTION, resources["loads_by_width"]
    assert resources["registers"] <= 128  # 4 blocks of 4 warps: 25% occupancy at least


def test_gpu_session_dry_run_prints_the_plan_in_order_and_runs_nothing(tmp_path):
    out = tmp_path / "session"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh")], capture_output=True, text=True,
                          env=dict(os.environ, DRY_RUN="1", OUT=str(out)), cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    plan = [line for line in done.stdout.splitlines() if line.startswith("plan: ")]
    names = [line.split()[1] for line in plan[:-1]]
    assert names == ["static-triton", "build", "tests", "layers", "models", "static-cuda", "report"]
    assert "TORCH_CUDA_ARCH_LIST=9.0" in plan[1] and "MAX_JOBS=16" in plan[1] and "--no-build-isolation" in plan[1]
    assert "test_dwconv_bn_act.py" in plan[2] and "test_squeeze_excite.py" in plan[2]
    assert f"--static {out}/static-triton.json" in plan[-2]
    budgets = [int(line.split("budget ")[1].split("s")[0]) for line in plan[1:-1]]
    assert sum(budgets) <= 8 * 60 + 90  # steps stop at what the session has left; this bounds the plan itself
    assert "session budget 480s" in plan[-1]
    assert not out.exists()  # a dry run writes nothing
