"""The bookkeeping a GPU run relies on, checked on the CPU: bytes formulas, records, the writer, the matrix."""
import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import cases, providers, results, shapes


def test_dwconv_bytes_by_hand():
    # x [2, 3, 5, 5] float16, 3x3 stride 2 pad 1 -> y [2, 3, 3, 3]; weight [3, 1, 3, 3] + bias [3] in float32
    expected = 2 * 3 * 5 * 5 * 2 + 2 * 3 * 3 * 3 * 2 + (3 * 9 + 3) * 4
    assert cases.dwconv_bytes(2, 3, 5, 5, (3, 3), (2, 2), (1, 1), (1, 1), element_size=2) == expected == 528


def test_squeeze_excite_bytes_by_hand():
    # x and y [2, 8, 4, 4] float32; w_reduce [2, 8], b_reduce [2], w_expand [8, 2], b_expand [8] in float32
    expected = 2 * (2 * 8 * 4 * 4 * 4) + (16 + 2 + 16 + 8) * 4
    assert cases.squeeze_excite_bytes(2, 8, 4, 4, 2, element_size=4) == expected == 2216


@pytest.mark.parametrize("entry", shapes.load_shapes()["dwconv_bn_act"], ids=lambda e: f"c{e['channels']}")
def test_dwconv_bytes_match_the_tensors_a_real_conv_touches(entry):
    case = cases.LayerCase("dwconv_bn_act", cases._frozen(entry), 3, torch.float16, True)
    x = torch.randn(case.input_shape)
    weight, bias = torch.randn(entry["channels"], 1, *entry["kernel"]), torch.randn(entry["channels"])
    y = F.conv2d(x, weight, bias, entry["stride"], entry["padding"], entry["dilation"], groups=entry["channels"])
    touched = (x.numel() + y.numel()) * 2 + (weight.numel() + bias.numel()) * 4
    assert case.bytes_moved == touched


def test_layer_fields_bandwidth_math():
    fields = results.layer_fields(bytes_moved=3_000_000_000, median_ms=2.0, copy_gbps=3000.0)
    assert fields == {"bytes": 3_000_000_000, "gbps": pytest.approx(1500.0), "frac_of_copy_bw": pytest.approx(0.5),
                      "copy_gbps": 3000.0}
    assert results.model_fields(batch=256, median_ms=4.0) == {"images_per_s": pytest.approx(64_000.0)}


def test_slugify_gpu_names():
    assert results.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert results.slugify("  NVIDIA H200 (MIG 1g.18gb) ") == "nvidia-h200-mig-1g-18gb"
    env = {"gpu": "NVIDIA H100 80GB HBM3", "date": "2031-02-03"}
    assert results.results_path(env).name == "nvidia-h100-80gb-hbm3-20310203.json"


def test_environment_names_every_version():
    env = results.environment(torch.device("cpu"))
    assert set(env) == {"gpu", "torch", "triton", "cuda", "date"}
    assert env["gpu"] == "cpu" and env["torch"] == torch.__version__ and len(env["date"]) == 10


def test_results_file_replaces_same_key_and_survives_reload(tmp_path):
    path = tmp_path / "gpu-20310203.json"
    writer = results.ResultsFile(path)
    first = {"family": "layer", "case": "c, batch 1", "provider": "eager", "median_ms": 2.0}
    other = {"family": "layer", "case": "c, batch 1", "provider": "mbkernels-cuda", "median_ms": 1.0}
    writer.add(first)
    writer.add(other)
    writer.add({**first, "median_ms": 1.5})
    on_disk = json.loads(path.read_text())
    assert [(r["provider"], r["median_ms"]) for r in on_disk] == [("mbkernels-cuda", 1.0), ("eager", 1.5)]
    assert list(tmp_path.iterdir()) == [path]  # no partial file left behind
    assert results.ResultsFile(path).find("layer", "c, batch 1", "eager")["median_ms"] == 1.5
    assert results.ResultsFile(path).find("model", "c, batch 1", "eager") is None


def test_layer_shapes_file_matches_the_models():
    """layer_shapes.json is what walking the timm models finds today (regenerate: python -m benchmarks.shapes)."""
    assert shapes.distinct_shapes() == shapes.load_shapes()


def test_full_matrix_covers_every_shape_batch_and_format(monkeypatch):
    monkeypatch.setenv("MBKERNELS_BENCH_QUICK", "0")
    all_shapes = shapes.load_shapes()
    for op in ("dwconv_bn_act", "squeeze_excite"):
        full = cases.layer_cases(op)
        assert len(full) == len(all_shapes[op]) * len(cases.BATCHES) * len(cases.FORMATS)
        assert len({case.label for case in full}) == len(full) == len({case.test_id for case in full})
        assert [case.priority for case in full] == sorted(case.priority for case in full)
    monkeypatch.setenv("MBKERNELS_BENCH_QUICK", "1")
    quick = cases.layer_cases("dwconv_bn_act")
    assert {(c.batch, c.dtype, c.channels_last) for c in quick} == set(cases.QUICK_LAYER_CONFIGS)
    assert all(case.priority == 0 for case in quick + cases.model_cases())


def test_compile_modes(monkeypatch):
    layer = cases.layer_cases("dwconv_bn_act")[0]
    headline = cases.ModelCase("mobilenetv3_large_100", 256, torch.float16, True)
    other = cases.ModelCase("mobilenetv3_large_100", 32, torch.float32, False)
    monkeypatch.delenv("MBKERNELS_BENCH_COMPILE_MODE", raising=False)
    monkeypatch.setenv("MBKERNELS_BENCH_QUICK", "0")
    assert cases.compile_mode(layer) == cases.compile_mode(headline) == "max-autotune-no-cudagraphs"
    assert cases.compile_mode(other) is None
    monkeypatch.setenv("MBKERNELS_BENCH_QUICK", "1")
    assert cases.compile_mode(layer) is cases.compile_mode(headline) is None
    monkeypatch.setenv("MBKERNELS_BENCH_COMPILE_MODE", "max-autotune")
    assert cases.compile_mode(other) == "max-autotune"


@pytest.mark.parametrize("channels_last", [False, True])
def test_inputs_are_distinct_buffers_in_the_requested_layout(channels_last):
    inputs = providers.make_inputs((2, 5, 3, 4), torch.float16, channels_last, torch.device("cpu"), 3)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert all(x.shape == (2, 5, 3, 4) and x.is_contiguous(memory_format=layout) for x in inputs)
    assert len({x.data_ptr() for x in inputs}) == 3 and not torch.equal(inputs[0], inputs[1])


def test_check_output_rejects_a_wrong_result():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float16)
    expected = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert providers.check_output(expected.half(), expected, x, 4e-3) < 4e-3
    wrong = expected.clone()
    wrong[1, 3, 4, 4] += 0.05 * expected.abs().max()
    with pytest.raises(AssertionError, match="exceeds"):
        providers.check_output(wrong.half(), expected, x, 4e-3)
    unwritten = expected.half()
    unwritten[0, 0, 0, 0] = float("nan")
    with pytest.raises(AssertionError, match="not finite"):
        providers.check_output(unwritten, expected, x, 4e-3)
    with pytest.raises(AssertionError, match="channels_last"):
        providers.check_output(expected.half(), expected, x.to(memory_format=torch.channels_last), 4e-3)


class _RecordingBench:
    device = torch.device("cpu")

    def __init__(self):
        self.records = []

    def record(self, fields):
        self.records.append(fields)


class _ForbiddenBenchmark:
    disabled = False

    def pedantic(self, *args, **kwargs):
        raise AssertionError("a provider that failed its check was timed")


@pytest.mark.parametrize("provider, status", [
    (lambda x: x * 1.5, "wrong"),
    (lambda x: x[:, :1], "wrong"),
    (lambda x: torch.ops.aten.nonexistent_op(x), "error"),
])
def test_a_failing_provider_is_recorded_and_never_timed(provider, status):
    from benchmarks.harness import check_then_time

    bench = _RecordingBench()
    inputs = providers.make_inputs((2, 3, 4, 4), torch.float32, False, bench.device, 2)
    with pytest.raises(Exception):
        check_then_time(_ForbiddenBenchmark(), bench, {"family": "layer", "case": "c", "provider": "p"},
                        build=lambda: provider, inputs=inputs, reference=lambda x: x.double(), tolerance=1e-4)
    assert [r["status"] for r in bench.records] == [status] and bench.records[0]["error"]


def test_a_right_provider_is_timed_and_recorded_with_its_error():
    from benchmarks.harness import check_then_time

    class Benchmark:
        disabled = False
        stats = None

        def pedantic(self, target, rounds, iterations, warmup_rounds):
            from pytest_benchmark.stats import Stats

            stats = Stats()
            for _ in range(rounds):
                target()
                stats.update(1e-3)
            self.stats = type("Metadata", (), {"stats": stats})()

    inputs = providers.make_inputs((2, 3, 4, 4), torch.float32, False, torch.device("cpu"), 2)
    fields = check_then_time(Benchmark(), _RecordingBench(), {"case": "c"}, build=lambda: torch.relu,
                             inputs=inputs, reference=lambda x: torch.relu(x.double()), tolerance=1e-6)
    assert fields["status"] == "ok" and fields["median_ms"] == pytest.approx(1.0) and fields["max_rel_err"] == 0
