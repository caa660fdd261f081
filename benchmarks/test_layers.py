"""Layer benchmarks: every distinct depthwise conv + BN + act and squeeze-excite of MobileNetV3-Large/-Small.

GPU providers: eager, compile, mbkernels-cuda, mbkernels-triton; each record carries the bytes the layer must
move and the achieved fraction of the device's copy bandwidth. Without a GPU: eager and mbkernels-reference on
a few small shapes (a smoke test of the harness and the reference numerics, run with --benchmark-disable).
"""
import pytest
import torch

from benchmarks import cases, providers
from benchmarks.harness import case_fields, cpu_params, gpu_params, measure
from benchmarks.results import layer_fields

OPS = ("dwconv_bn_act", "squeeze_excite")
GPU_PAIRS = [(case, p) for op in OPS for case in cases.layer_cases(op) for p in providers.LAYER_PROVIDERS_GPU]
SMOKE_PAIRS = [
    (case, p)
    for op, count in (("dwconv_bn_act", 3), ("squeeze_excite", 2))
    for case in cases.smoke_layer_cases(op, count)
    for p in providers.LAYER_PROVIDERS_CPU
]


def _run_layer(case: cases.LayerCase, provider: str, benchmark, bench) -> None:
    bench.skip_if_measured("layer", case.label, provider)
    stock = providers.stock_layer(case, torch.Generator().manual_seed(0))
    fields = {**case_fields("layer", case, provider), "op": case.op, **dict(case.shape),
              "tensor_bytes": case.input_bytes}
    measure(benchmark, bench, case, stock, fields,
            build=lambda module, x: providers.layer_provider(provider, case, module, x),
            tolerance=providers.LAYER_TOLERANCE[case.dtype],
            derived=lambda median_ms: layer_fields(case.bytes_moved, median_ms, bench.copy_gbps))


@pytest.mark.parametrize("case, provider", gpu_params(GPU_PAIRS))
def test_layer(case, provider, benchmark, bench):
    _run_layer(case, provider, benchmark, bench)


@pytest.mark.parametrize("case, provider", cpu_params(SMOKE_PAIRS))
def test_layer_smoke(case, provider, benchmark, bench):
    _run_layer(case, provider, benchmark, bench)
