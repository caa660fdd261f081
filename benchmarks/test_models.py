"""Whole-model benchmarks: MobileNetV3-Large, MobileNetV3-Small and EfficientNet-B0 (timm, random weights).

GPU providers: eager, compile, patched, patched+compile, patched+tuned, patched+tuned+compile (tuned at the case's
input); at batch 1 also compile-reduce-overhead (inductor's CUDA graphs) against patched-cudagraph (the patched
model in one torch.cuda.CUDAGraph). Without a GPU: eager, the model patched onto the reference backend and the
tuned one, MobileNetV3-Small at 64x64 (smoke test).
"""
import pytest
import torch

from benchmarks import cases, providers
from benchmarks.harness import case_fields, cpu_params, gpu_params, measure
from benchmarks.results import model_fields


def _model_providers(case: cases.ModelCase) -> tuple:
    if case.batch != 1:
        return providers.MODEL_PROVIDERS_GPU
    if cases.quick():  # batch 1 carries the CUDA-graph target; the plain compiled pair is a full-matrix extra
        return ("eager", "patched", "patched+tuned") + providers.MODEL_PROVIDERS_BATCH1
    return providers.MODEL_PROVIDERS_GPU + providers.MODEL_PROVIDERS_BATCH1


GPU_PAIRS = [(case, p) for case in cases.model_cases() for p in _model_providers(case)]
SMOKE_PAIRS = [(cases.SMOKE_MODEL_CASE, p) for p in providers.MODEL_PROVIDERS_CPU]


def _run_model(case: cases.ModelCase, provider: str, benchmark, bench) -> None:
    bench.skip_if_measured("model", case.label, provider)
    stock = providers.stock_model(case.model, torch.Generator().manual_seed(0))
    fields = {**case_fields("model", case, provider), "model": case.model, "image_size": case.image_size}
    measure(benchmark, bench, case, stock, fields,
            build=lambda model, x: providers.model_provider(provider, case, model, x),
            tolerance=providers.MODEL_TOLERANCE[case.dtype],
            derived=lambda median_ms: model_fields(case.batch, median_ms))


@pytest.mark.parametrize("case, provider", gpu_params(GPU_PAIRS))
def test_model(case, provider, benchmark, bench):
    _run_model(case, provider, benchmark, bench)


@pytest.mark.parametrize("case, provider", cpu_params(SMOKE_PAIRS))
def test_model_smoke(case, provider, benchmark, bench):
    _run_model(case, provider, benchmark, bench)
