"""Block benchmarks: every distinct inverted-residual block of MobileNetV3-Large/-Small and EfficientNet-B0.

GPU providers: eager (the stock block), compile, mbkernels-triton (the whole block fused); each record carries
the bytes the block plan must move (benchmarks/blocks.py) and the achieved fraction of the copy bandwidth.
Without a GPU: eager and mbkernels-reference on three small MobileNetV3-Small blocks (run with
--benchmark-disable), and the traffic model's ordering.
"""
import pytest

from benchmarks import blocks, providers
from benchmarks.harness import case_fields, cpu_params, gpu_params, measure
from benchmarks.results import layer_fields

from mbkernels.nn import InvertedResidual

BLOCK_PROVIDERS_GPU = ("eager", "compile", "mbkernels-triton")
BLOCK_PROVIDERS_CPU = ("eager", "mbkernels-reference")
GPU_PAIRS = [(case, p) for case in blocks.block_cases() for p in BLOCK_PROVIDERS_GPU]
SMOKE_PAIRS = [(case, p) for case in blocks.smoke_block_cases() for p in BLOCK_PROVIDERS_CPU]


def _provider(provider: str, case: blocks.BlockCase, module, example):
    if provider == "eager":
        return module
    if provider == "compile":
        return providers.compiled(module, None, example)
    return InvertedResidual.from_module(module, backend=provider.removeprefix("mbkernels-")).eval()


def _run_block(case: blocks.BlockCase, provider: str, benchmark, bench) -> None:
    bench.skip_if_measured("block", case.label, provider)
    fields = {**case_fields("block", case, provider), "model": case.model, "block": case.path,
              "tensor_bytes": case.input_bytes}
    measure(benchmark, bench, case, case.fused().stock, fields,
            build=lambda module, x: _provider(provider, case, module, x),
            tolerance=providers.LAYER_TOLERANCE[case.dtype],
            derived=lambda median_ms: layer_fields(case.bytes_moved, median_ms, bench.copy_gbps))


@pytest.mark.parametrize("case, provider", gpu_params(GPU_PAIRS))
def test_block(case, provider, benchmark, bench):
    _run_block(case, provider, benchmark, bench)


@pytest.mark.parametrize("case, provider", cpu_params(SMOKE_PAIRS))
def test_block_smoke(case, provider, benchmark, bench):
    _run_block(case, provider, benchmark, bench)


def test_traffic_model_orders_the_plans():
    """Block fusion moves less than layer fusion, which moves less than compile's plan, on every model; the
    table prints (benchmarks/blocks.py's command)."""
    for model in blocks.MODELS:
        plans = blocks.traffic(model, batch=256, element_size=2)
        assert plans["block"] < plans["layers"] < plans["compile"]
        assert plans["outside"] < plans["block"]
    table = blocks.traffic_table(batch=256)
    assert all(model in table for model in blocks.MODELS)


def test_block_kernels_compile_for_sm90_without_spills():
    """The static gate on the first blocks of MobileNetV3-Small (the full report: python -m
    benchmarks.blocks_static): the launches the GPU launcher plans compile for sm_90, without spills, within
    shared memory."""
    from benchmarks import blocks_static
    from mbkernels.backends.triton import interpreting

    if interpreting():
        pytest.skip("TRITON_INTERPRET=1: the launcher plans the interpreter's tiles, not the GPU's")
    rows = blocks_static.report("mobilenetv3_small_100", batch=8, first=2)
    assert {row["kernel"] for row in rows} == {"_block_kernel", "_mlp_kernel", "_project_kernel"}
    assert not [row for row in rows if blocks_static._failures(row)], rows
