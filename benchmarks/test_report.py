"""The report, on a synthetic results file written to a temp dir by the same writer a GPU run uses."""
import os
import time

import pytest
import torch

from benchmarks import cases, report, results
from benchmarks.harness import case_fields

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "date": "2031-02-03"}
COPY_GBPS = 3000.0


def _dwconv_case(batch: int) -> cases.LayerCase:
    entry = {"channels": 64, "height": 112, "width": 112, "kernel": [3, 3], "stride": [2, 2],
             "padding": [1, 1], "dilation": [1, 1], "activation": "relu"}
    return cases.LayerCase("dwconv_bn_act", cases._frozen(entry), batch, torch.float16, True)


def _se_case() -> cases.LayerCase:
    entry = {"channels": 72, "height": 28, "width": 28, "reduced": 24, "activation": "relu", "gate": "hardsigmoid"}
    return cases.LayerCase("squeeze_excite", cases._frozen(entry), 256, torch.float16, True)


def _layer_record(case, provider, median_ms):
    record = {**case_fields("layer", case, provider), "op": case.op, "tensor_bytes": case.input_bytes,
              "median_ms": median_ms, "status": "ok", **ENV}
    return {**record, **results.layer_fields(case.bytes_moved, median_ms, COPY_GBPS)}


def _wrong_layer_record(case, provider):
    return {**case_fields("layer", case, provider), "op": case.op, "tensor_bytes": case.input_bytes,
            "status": "wrong", "error": "max error 0.5 of the largest reference value exceeds 4e-03", **ENV}


def _model_record(case, provider, median_ms):
    return {**case_fields("model", case, provider), "model": case.model, "median_ms": median_ms, "status": "ok",
            **results.model_fields(case.batch, median_ms), **ENV}


def synthetic_records() -> list:
    big, small, se = _dwconv_case(256), _dwconv_case(1), _se_case()
    assert big.input_bytes > cases.BANDWIDTH_TARGET_MIN_BYTES > small.input_bytes
    cuda_ms = big.bytes_moved / (0.9 * COPY_GBPS * 1e9) * 1e3  # moves the big case's bytes at 90% of copy BW
    records = [
        _layer_record(big, "eager", 4 * cuda_ms),
        _layer_record(big, "compile", 2 * cuda_ms),
        _layer_record(big, "mbkernels-cuda", cuda_ms),  # 4x eager, 2x compile, 90%: all met
        _layer_record(big, "mbkernels-triton", 2 * cuda_ms),  # 2x eager: short of 2.5x by 20%; 45% of copy BW
        _layer_record(small, "eager", 0.030),
        _layer_record(small, "mbkernels-cuda", 0.010),  # small: no bandwidth target
        _wrong_layer_record(small, "mbkernels-triton"),
        _layer_record(se, "eager", 0.9),
        _layer_record(se, "compile", 0.4),
        _layer_record(se, "mbkernels-cuda", 0.25),  # 3.6x eager, 1.6x compile
    ]
    b256 = cases.ModelCase("mobilenetv3_large_100", 256, torch.float16, True)
    b1 = cases.ModelCase("mobilenetv3_large_100", 1, torch.float16, True)
    records += [
        _model_record(b256, "eager", 20.0),
        _model_record(b256, "compile", 10.0),
        _model_record(b256, "patched", 10.0),  # 2.0x eager: met
        _model_record(b256, "patched+compile", 9.0),  # 1.11x compile: short of 1.25x by 11%
        _model_record(b1, "compile-reduce-overhead", 0.50),
        _model_record(b1, "patched-cudagraph", 0.40),  # faster: met
    ]
    return records


@pytest.fixture
def results_file(tmp_path, monkeypatch):
    monkeypatch.setenv(results.RESULTS_DIR_ENV, str(tmp_path))
    path = results.results_path(ENV)
    writer = results.ResultsFile(path)
    for record in synthetic_records():
        writer.add(record)
    return path


def test_report_writes_markdown_and_plots(results_file):
    assert report.main([]) == 0
    markdown = (results_file.parent / f"{results_file.stem}.md").read_text()
    for name in ("layers-bandwidth", "layers-speedup", "models"):
        png = results_file.parent / f"{results_file.stem}-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png.name} is not a PNG"
        assert f"({png.name})" in markdown
    assert "NVIDIA H100 80GB HBM3" in markdown and "3000 GB/s" in markdown


def test_report_marks_met_and_missed_targets(results_file):
    report.main([])
    markdown = (results_file.parent / f"{results_file.stem}.md").read_text()
    big_row = next(line for line in markdown.splitlines()
                   if line.startswith("| dwconv 3x3 s2 c64 112x112 relu, batch 256"))
    assert "4.00x ✓" in big_row and "2.00x ✓" in big_row and "90% ✓" in big_row
    assert "2.00x ✗ (target 2.50x, short by 20%)" in big_row
    assert "45% ✗ (target 85%, short by 47%)" in big_row
    small_row = next(line for line in markdown.splitlines()
                     if line.startswith("| dwconv 3x3 s2 c64 112x112 relu, batch 1,"))
    assert "wrong" in small_row and "3.00x ✓" in small_row
    assert "%" in small_row and "% ✓" not in small_row and "% ✗" not in small_row  # no bandwidth target
    assert "1.11x ✗ (target 1.25x, short by 11%)" in markdown
    assert "1.25x ✓" in markdown  # CUDA graph: 0.50 / 0.40


def test_summary_counts_cases_per_target(results_file):
    groups = report.group_cases(results.ResultsFile(results_file).records)
    outcome = {target.name: rows for target, rows in report.evaluate(groups)}
    bandwidth = outcome["fused dwconv: fraction of copy bandwidth"]
    assert sorted((provider, met) for _, provider, _, met in bandwidth) == [
        ("mbkernels-cuda", True), ("mbkernels-triton", False)]  # the batch-1 case is under 16 MiB
    over_eager = outcome["fused dwconv: speedup over eager"]
    assert len(over_eager) == 3  # big cuda, big triton, small cuda; the wrong triton case has no value
    assert outcome["model: patched over eager"] == [
        ("mobilenetv3_large_100, batch 256, float16 channels_last", "patched", 2.0, True)]


def test_newest_results_file_is_chosen_by_date_then_mtime(tmp_path):
    old = tmp_path / "nvidia-h100-20300101.json"
    new = tmp_path / "nvidia-h100-20310101.json"
    other_gpu_same_day = tmp_path / "nvidia-h200-20310101.json"
    for path in (new, other_gpu_same_day, old):  # old written last: mtime alone would pick it
        path.write_text("[]")
        time.sleep(0.01)
    os.utime(new, (time.time() + 5, time.time() + 5))
    (tmp_path / "notes.json").write_text("[]")
    assert report.newest_results(tmp_path) == new
    with pytest.raises(FileNotFoundError, match="no results file"):
        report.newest_results(tmp_path / "empty")


def test_later_files_override_earlier_records(tmp_path):
    first, second = tmp_path / "a-20310101.json", tmp_path / "a-20310102.json"
    record = {"family": "model", "case": "m, batch 1", "provider": "eager", "median_ms": 2.0}
    results.ResultsFile(first).add(record)
    results.ResultsFile(second).add({**record, "median_ms": 1.0})
    assert [r["median_ms"] for r in report.load_records([first, second])] == [1.0]
