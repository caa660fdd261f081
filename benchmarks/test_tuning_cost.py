"""What a tuned patch costs (benchmarks/tune_models.py): MobileNetV3-Large tuned at one batch size, on a GPU in
float16 channels_last at batch 32, within 10 s and with extra memory at most twice the largest activation; without
a GPU a smoke run (MobileNetV3-Small, 64x64, float32) records the seconds only."""
import pytest
import torch

from benchmarks.tune_models import tuning_cost

GPU_TARGET_S = 10.0
MEMORY_TARGET = 2.0  # extra peak memory over the largest activation


@pytest.fixture(autouse=True)
def _table(tmp_path, monkeypatch):
    """A fresh table: the case measures a first tuning, not a cache hit."""
    monkeypatch.setenv("MBKERNELS_TUNING_CACHE", str(tmp_path / "tuning.json"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tuning_cost_on_a_gpu(bench):
    record = tuning_cost("mobilenetv3_large_100", 32, torch.float16, True, torch.device("cuda"))
    bench.record({"family": "tuning", "case": "mobilenetv3_large_100-b32-fp16-cl", "provider": "patched+tuned",
                  "status": "ok", **record, "target_s": GPU_TARGET_S, "target_memory": MEMORY_TARGET})
    assert record["timed"] > 0
    assert record["tune_s"] <= GPU_TARGET_S, record
    assert record["extra_over_largest"] <= MEMORY_TARGET, record


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke case")
def test_tuning_cost_smoke():
    record = tuning_cost("mobilenetv3_small_100", 1, torch.float32, False, torch.device("cpu"), size=64)
    assert record["timed"] > 0 and record["tune_s"] > 0 and record["largest_activation_bytes"] > 0
