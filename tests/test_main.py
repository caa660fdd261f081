"""python -m mbkernels: the table, the check and its exit codes."""
import logging
import subprocess
import sys

import pytest
from conftest import HAS_GPU

import mbkernels
from mbkernels import __main__ as command
from mbkernels.backends import OpSupport, reference

pytest.importorskip("torchvision")
QUICK = ["--model", "tv:mobilenet_v3_small", "--size", "40", "--batch", "2", "--iters", "1", "--backend", "reference",
         "--no-tune"]


def run(capsys, *args) -> tuple[int, list]:
    code = command.main([*QUICK, *args])
    out = capsys.readouterr().out
    return code, out.splitlines()


def rows(lines: list) -> dict:
    """The table's rows by variant: {label: [latency, images/s, speedup, error, top-1]}."""
    start = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    table = lines[start + 2:]
    return {" ".join(line.split()[:2]): line.split()[2:] for line in table[: table.index(lines[start + 1])]}


def test_quick_run_prints_one_table_and_passes(capsys):
    code, lines = run(capsys, "--no-compile")
    assert code == 0
    assert lines[0] == "model   tv:mobilenet_v3_small: batch 2, 3x40x40, float32, NCHW"
    assert lines[1].startswith("device  cpu") and lines[1].endswith("backend reference")
    # the planner's choice: a CPU model gets layer fusion
    assert lines[2].startswith("fused   11 dwconv+bn+act, 9 squeeze-excite, 0 block, 23 conv+bn+act")
    table = rows(lines)
    assert list(table) == ["stock eager", "patched eager"]
    latency, throughput, speedup, error, top1 = table["patched eager"]
    assert float(latency) > 0 and float(throughput) > 0 and speedup.endswith("x")
    assert 0 < float(error) < 1e-4 and top1 == "2/2"
    assert table["stock eager"][2:] == ["1.00x", "0.0e+00", "2/2"]
    assert lines[-1] == "check: PASS (every output within 1e-04 of stock eager)"


def test_tuned_rows(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MBKERNELS_TUNING_CACHE", str(tmp_path / "tuning.json"))
    code = command.main([argument for argument in QUICK if argument != "--no-tune"] + ["--no-compile"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0, "\n".join(lines)
    table = rows(lines)
    assert list(table) == ["stock eager", "patched eager", "tuned eager"]
    assert float(table["tuned eager"][0]) > 0 and float(table["tuned eager"][3]) < 1e-4
    assert (tmp_path / "tuning.json").exists()


def test_compiled_rows(capsys):
    code, lines = run(capsys, "--compile-backend", "aot_eager", "--channels-last")
    assert code == 0, "\n".join(lines)
    assert "channels_last" in lines[0]
    table = rows(lines)
    assert list(table) == ["stock eager", "patched eager", "stock compiled", "patched compiled"]
    assert float(table["patched compiled"][3]) < 1e-4


def test_a_tolerance_nothing_meets_fails(capsys):
    code, lines = run(capsys, "--no-compile", "--tolerance", "0")
    assert code == 1
    assert lines[-1].startswith("check: FAIL -- patched eager: max relative error")


def test_a_wrong_kernel_fails_the_check(capsys, monkeypatch):
    def patch_then_break_the_kernel(model, **kwargs):
        mbkernels.patch(model, **kwargs)  # checked with the good kernel
        monkeypatch.setitem(reference.BACKEND.ops, "dwconv_bn_act", OpSupport(lambda args: good(args) * 1.01))
        return model

    good = reference.dwconv_bn_act
    monkeypatch.setattr(command, "patch", patch_then_break_the_kernel)
    code, lines = run(capsys, "--no-compile")
    assert code == 1
    assert lines[-1].startswith("check: FAIL -- patched eager")


@pytest.mark.skipif(HAS_GPU, reason="torch logs the notice only where there is no GPU")
def test_on_the_cpu_torchs_no_gpu_notice_is_dropped_and_nothing_else(capsys, caplog):
    """torch.compile imports torch.utils.cpp_extension, which logs "No CUDA runtime is found" where a CUDA toolkit
    is installed without a GPU; the command drops that line (its header says it runs on the CPU), not the rest."""
    assert run(capsys, "--no-compile")[0] == 0
    logger = logging.getLogger("torch.utils.cpp_extension")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
        logger.warning("Error checking compiler version for c++")
    assert [record.getMessage() for record in caplog.records] == ["Error checking compiler version for c++"]


def test_the_command_line():
    quick = [sys.executable, "-m", "mbkernels", *QUICK, "--no-compile"]
    done = subprocess.run(quick, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "check: PASS" in done.stdout
    assert "[mbkernels] patching" in done.stderr  # progress goes to stderr
    bad = subprocess.run(quick + ["--model", "tv:no_such_model"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "no_such_model" in bad.stderr
