"""Layer benchmarks: every distinct depthwise conv + BN + act and squeeze-excite of MobileNetV3-Large/-Small.

GPU providers: eager, compile, mbkernels-cuda, mbkernels-triton; each record carries the bytes the layer must
move and the achieved fraction of the device's copy bandwidth. Without a GPU: eager and mbkernels-reference on
a few small shapes (a smoke test of the harness and the reference numerics, run with --benchmark-disable).
"""
import pytest
import torch

from benchmarks import cases, providers, timing
from benchmarks.harness import case_fields, check_then_time, cpu_params, gpu_params
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
    device = bench.device
    generator = torch.Generator().manual_seed(0)
    stock = providers.stock_layer(case, generator)
    module = providers.on_device(stock, device, case.dtype, case.channels_last)
    reference = providers.on_device(stock, device, torch.float64, channels_last=False)
    count = timing.buffer_count(case.input_bytes, device)
    inputs = providers.make_inputs(case.input_shape, case.dtype, case.channels_last, device, count)
    fields = {**case_fields("layer", case, provider), "op": case.op, **dict(case.shape),
              "tensor_bytes": case.input_bytes}
    timed = check_then_time(
        benchmark, bench, fields,
        build=lambda: providers.layer_provider(provider, case, module, inputs[0]),
        inputs=inputs,
        reference=lambda x: reference(x.double()),
        tolerance=providers.LAYER_TOLERANCE[case.dtype],
    )
    if timed is not None:
        record = {**timed, **layer_fields(case.bytes_moved, timed["median_ms"], bench.copy_gbps)}
        benchmark.extra_info.update(record)
        bench.record(record)


@pytest.mark.parametrize("case, provider", gpu_params(GPU_PAIRS))
def test_layer(case, provider, benchmark, bench):
    _run_layer(case, provider, benchmark, bench)


@pytest.mark.parametrize("case, provider", cpu_params(SMOKE_PAIRS))
def test_layer_smoke(case, provider, benchmark, bench):
    _run_layer(case, provider, benchmark, bench)
