"""python -m mbkernels: the table, the check and its exit codes."""
import dataclasses
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import HAS_GPU

import mbkernels
from mbkernels import __main__ as command
from mbkernels import backends
from mbkernels.backends import OpSupport, reference

pytest.importorskip("torchvision")
QUICK = ["--model", "tv:mobilenet_v3_small", "--size", "40", "--batch", "2", "--iters", "1", "--backend", "reference",
         "--no-tune", "--threads", "1"]


def run(capsys, *args) -> tuple[int, list]:
    code = command.main([*QUICK, *args])
    out = capsys.readouterr().out
    return code, out.splitlines()


def rows(lines: list) -> dict:
    """The table's rows by variant: {label: [latency, images/s, speedup, spread, error, top-1]}, cut at the
    columns the rule under the head marks (a blank cell is '')."""
    start = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    rule = lines[start + 1]
    spans = [(m.start(), m.end()) for m in re.finditer("-+", rule)]
    table = lines[start + 2:]
    return {line[:spans[0][1]].strip(): [line[a:b].strip() for a, b in spans[1:]]
            for line in table[: table.index(rule)]}


def test_quick_run_prints_one_table_and_passes(capsys):
    code, lines = run(capsys, "--no-compile")
    assert code == 0
    assert lines[0] == "model   tv:mobilenet_v3_small: batch 2, 3x40x40, float32, NCHW"
    assert lines[1].startswith("device  cpu") and lines[1].endswith("backend reference")
    # the planner's choice: a CPU model gets layer fusion
    assert lines[2].startswith("fused   11 dwconv+bn+act, 9 squeeze-excite, 0 block, 23 conv+bn+act")
    table = rows(lines)
    assert list(table) == ["stock eager", "patched eager"]
    latency, throughput, speedup, spread, error, top1 = table["patched eager"]
    assert float(latency) > 0 and float(throughput) > 0 and speedup.endswith("x")
    assert spread == ""  # one round measures none, and the warning says so
    assert 0 < float(error) < 1e-4 and top1 == "2/2"
    assert table["stock eager"][2:] == ["1.00x", "", "0.0e+00", "2/2"]
    assert "1 CPU threads (torch.set_num_threads)" in "\n".join(lines)
    assert lines[-2].startswith("ratios unreliable: 1 round measures no spread")
    assert lines[-1] == "check: PASS (every output within 1e-04 of stock eager)"


def test_tuned_rows(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MBKERNELS_TUNING_CACHE", str(tmp_path / "tuning.json"))
    code = command.main([argument for argument in QUICK if argument != "--no-tune"] + ["--no-compile"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0, "\n".join(lines)
    table = rows(lines)
    assert list(table) == ["stock eager", "patched eager", "tuned eager"]
    assert float(table["tuned eager"][0]) > 0 and float(table["tuned eager"][4]) < 1e-4
    assert (tmp_path / "tuning.json").exists()


def test_compiled_rows(capsys):
    code, lines = run(capsys, "--compile-backend", "aot_eager", "--channels-last")
    assert code == 0, "\n".join(lines)
    assert "channels_last" in lines[0]
    table = rows(lines)
    assert list(table) == ["stock eager", "patched eager", "stock compiled", "patched compiled"]
    assert float(table["patched compiled"][4]) < 1e-4


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


def scripted_timer(monkeypatch, ms: list, load: float = 0.0):
    """Each timed call takes the next of ms, in the order the rounds run them; the machine's load is `load`."""
    times = iter(ms)
    monkeypatch.setattr(command, "elapsed_ms", lambda run, device: next(times))
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))


def test_variants_take_turns_each_round_and_steady_rounds_pass_unwarned(capsys, monkeypatch):
    scripted_timer(monkeypatch, [10, 5] * 3, load=os.cpu_count())  # every core busy: ours, timing
    pinned = []
    monkeypatch.setattr(torch, "set_num_threads", pinned.append)
    code, lines = run(capsys, "--no-compile", "--iters", "3", "--threads", "2")
    assert code == 0 and pinned[0] == 2  # first, before any work (patch's probes pin and restore their own)
    table = rows(lines)
    assert table["stock eager"][:4] == ["10.00", "200.0", "1.00x", ""]
    assert table["patched eager"][:4] == ["5.00", "400.0", "2.00x", "±0%"]
    assert not any("unreliable" in line for line in lines)
    assert "timing  3 rounds, every variant once per round in turn; 2 CPU threads" in "\n".join(lines)


def test_rounds_that_disagree_say_the_ratios_are_unreliable(capsys, monkeypatch):
    # stock, patched in turn: per-round ratios 2, 0.5, 2 (timed one variant after the other, the medians
    # would be 10 ms each and the speedup 1.00x)
    scripted_timer(monkeypatch, [10, 5, 10, 20, 10, 5])
    code, lines = run(capsys, "--no-compile", "--iters", "3")
    assert code == 0
    assert rows(lines)["patched eager"][2:4] == ["2.00x", "±19%"]
    assert lines[-2] == "ratios unreliable: the rounds disagree (patched eager ±19%; more than ±10%)"


def test_a_busy_machine_says_the_ratios_are_unreliable(capsys, monkeypatch):
    cores = os.cpu_count()
    scripted_timer(monkeypatch, [10, 5] * 3, load=cores + 1)
    code, lines = run(capsys, "--no-compile", "--iters", "3")
    assert code == 0
    assert lines[-2] == f"ratios unreliable: the machine is busy (load average {cores + 1:.1f} on {cores} cores)"


BAD_VALUES = {
    "batch-negative": (["--batch", "-3"], "--batch must be at least 1, got -3"),
    "batch-zero": (["--batch", "0"], "--batch must be at least 1, got 0"),
    "iters-zero": (["--iters", "0"], "--iters must be at least 1, got 0"),
    "size-zero": (["--size", "0"], "--size must be at least 1, got 0"),
    "threads-zero": (["--threads", "0"], "--threads must be at least 1, got 0"),
    "tolerance-negative": (["--tolerance", "-1"], "--tolerance must be a finite number >= 0, got -1.0"),
    "tolerance-nan": (["--tolerance", "nan"], "--tolerance must be a finite number >= 0, got nan"),
    "batch-not-int": (["--batch", "two"], "argument --batch: invalid int value: 'two'"),
    "device": (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    "compile-backend": (["--compile-backend", "nope"], "--compile-backend 'nope': torch.compile has no such backend"),
    "model": (["--model", "tv:no_such_model"], "neither timm nor torchvision has a model 'no_such_model'"),
}


@pytest.mark.parametrize("argv, message", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_a_bad_option_value_is_one_line_and_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(command, "patch", lambda *args, **kwargs: pytest.fail("work began"))
    with pytest.raises(SystemExit) as exited:
        command.main([*QUICK, *argv])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    said = [line for line in err.splitlines() if not line.startswith("[mbkernels]")]  # progress lines aside
    assert len(said) == 1 and said[0].startswith("python -m mbkernels: error: ") and message in said[0]


@pytest.mark.skipif(HAS_GPU, reason="a GPU runs every backend")
def test_a_backend_that_cannot_run_here_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit) as exited:
        command.main([*QUICK, "--backend", "triton"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "python -m mbkernels: error: --backend triton cannot run on cpu here: no CUDA GPU (set TRITON_INTERPRET=1 "
        "before importing mbkernels to run the Triton kernels on the CPU) (--help lists the options)"]
    with pytest.raises(SystemExit) as exited:
        command.main([*QUICK, "--device", "cuda"])
    assert exited.value.code == 2


def test_a_backend_that_serves_another_device_is_one_line_and_exit_2(capsys, monkeypatch):
    gpu_only = dataclasses.replace(backends.get("triton"), devices=("cuda",), opt_in_devices=(),
                                   unavailable_reason=lambda: None)
    reference = backends.get("reference")
    monkeypatch.setattr(backends, "declared", lambda: (gpu_only, reference))
    with pytest.raises(SystemExit) as exited:
        command.main([*QUICK, "--backend", "triton", "--device", "cpu"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "python -m mbkernels: error: --backend triton cannot run on cpu here: x is on cpu; the triton backend runs "
        "cuda tensors (--help lists the options)"]


@pytest.mark.skipif(HAS_GPU or not mbkernels.backend_status()["cuda"].available,
                    reason="the CUDA kernels' host emulation: mbkernels._C on a machine without a GPU")
def test_the_cuda_backend_on_the_cpu_says_it_is_emulated(capsys):
    code, lines = run(capsys, "--no-compile", "--backend", "cuda")
    assert code == 0
    notes = [line for line in lines if line.startswith("note")]
    assert len(notes) == 1 and "the cuda backend is emulated here" in notes[0] and "host emulation" in notes[0]
    assert "no speed claim" in notes[0]


def test_every_option_has_help():
    assert all(action.help for action in command.make_parser()._actions)
