"""Robustness: concurrency (threads, first calls included), streams and devices, CUDA graphs, torch.compile's
reduce-overhead mode, and tensors of more than 2**31 elements (64-bit indexing).

The GPU tests skip with their reason here; the concurrency tests run on the CPU too (Triton interpreter, the CUDA
kernels' host emulation, reference).
"""
import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import mbkernels
from conftest import ALL_BACKENDS, DEVICE, HAS_GPU, KERNEL_BACKENDS, assert_close_to_reference
from mbkernels import ops
from mbkernels.match import randomize_batchnorm
from oracle import dwconv64, se64

needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
THREADS = 4


# ------------------------------------------------------------------------------------------------ helpers
def dwconv_args(x, kernel=(3, 3), generator=None):
    c = x.shape[1]
    weight = torch.randn(c, 1, *kernel, generator=generator).to(x.device)
    return weight, torch.randn(c, generator=generator).to(x.device)


def se_args(x, reduced, generator=None):
    c = x.shape[1]
    return [torch.randn(*shape, generator=generator).to(x.device) for shape in ((reduced, c), (reduced,), (c, reduced),
                                                                                 (c,))]


@pytest.fixture(scope="module")
def mobilenet():
    """(stock, patched) timm mobilenetv3_small_100 on the CPU, float32, random BN; patched once (it takes
    seconds). Tests move copies where they need them; the backend comes from MBKERNELS_BACKEND at each call."""
    timm = pytest.importorskip("timm")
    patch = mbkernels.patch
    stock = randomize_batchnorm(timm.create_model("mobilenetv3_small_100", pretrained=False), torch.Generator().manual_seed(0)).eval()
    patched = patch(copy.deepcopy(stock), blocks=False)  # layer fusion: every backend (cuda too) runs its ops
    fused = sum(isinstance(m, mbkernels.nn.DWConvBNAct) for m in patched.modules())
    assert fused > 0, "patch fused no depthwise conv in mobilenetv3_small_100"
    return stock, patched


def assert_close_relative(out: torch.Tensor, reference: torch.Tensor, rtol: float) -> None:
    """Each element within rtol of the largest reference value (a whole model's float32 drift)."""
    got, want = out.double().cpu(), reference.double().cpu()
    assert torch.isfinite(got).all(), "non-finite outputs"
    scale = want.abs().max().item()
    assert scale > 1e-3, f"reference too small ({scale}) for a meaningful comparison"
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale)


def run_in_threads(work, count: int = THREADS):
    """work(i) in `count` threads released at once; the results in order, the first exception re-raised."""
    start = threading.Barrier(count)

    def task(i):
        start.wait()
        return work(i)

    with ThreadPoolExecutor(count) as pool:
        return [f.result() for f in [pool.submit(task, i) for i in range(count)]]


# -------------------------------------------------------------------------------------------- concurrency
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ops_from_many_threads(backend):
    """THREADS threads call both ops at once, each with its own shapes; on a GPU the first call of a new kernel
    configuration (a 5x3 dilated relu6 conv, used nowhere else) compiles while the other threads wait on it."""

    def work(i):
        generator = torch.Generator().manual_seed(100 + i)
        results = []
        for step in range(2):
            x = torch.randn(1 + i % 2, 6 + i, 9 + step, 7 + i, generator=generator).to(DEVICE)
            weight, bias = dwconv_args(x, (5, 3), generator)
            y = ops.dwconv_bn_act(x, weight, bias, 2, [4, 1], [2, 1], "relu6", backend)
            results.append((y, dwconv64(x, weight, bias, [2, 2], [4, 1], [2, 1], "relu6")))
            se = se_args(x, 3, generator)
            y = ops.squeeze_excite(x, *se, "silu", "sigmoid", backend)
            results.append((y, se64(x, *se, "silu", "sigmoid")))
        return results

    for results in run_in_threads(work):
        for out, reference in results:
            assert_close_to_reference(out, reference, torch.float32)


def fused_block(channels: int, seed: int) -> nn.Module:
    """A hand-built inference block of the package's fused modules (no patch needed): dwconv-BN-act twice."""
    torch.manual_seed(seed)
    layers = []
    for kernel, stride, act in ((3, 1, nn.Hardswish()), (5, 2, nn.ReLU())):
        conv = nn.Conv2d(channels, channels, kernel, stride, kernel // 2, groups=channels, bias=False)
        layers.append(mbkernels.nn.DWConvBNAct(conv, nn.BatchNorm2d(channels), act))
    return randomize_batchnorm(nn.Sequential(*layers), torch.Generator().manual_seed(seed)).eval()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fused_modules_from_many_threads(backend, monkeypatch):
    """One module shared by THREADS threads: its folded-weight cache is filled by whichever thread comes first."""
    monkeypatch.setenv("MBKERNELS_BACKEND", backend)
    model = fused_block(12, seed=1).to(DEVICE)
    reference_model = nn.Sequential(*[nn.Sequential(m.conv, m.bn, m.act) for m in model]).double()
    inputs = [torch.randn(2, 12, 11 + i, 13, device=DEVICE) for i in range(THREADS)]

    def work(i):
        with torch.inference_mode():
            return model(inputs[i])

    outputs = run_in_threads(work)
    with torch.no_grad():
        for x, out in zip(inputs, outputs):
            assert_close_to_reference(out, reference_model(x.double()), torch.float32)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_patched_model_from_many_threads(backend, mobilenet, monkeypatch):
    """A patched timm mobilenetv3_small_100 called by THREADS threads at once: right answers, no crash."""
    stock, patched = mobilenet
    model = copy.deepcopy(patched).to(DEVICE)
    reference_model = copy.deepcopy(stock).double()
    monkeypatch.setenv("MBKERNELS_BACKEND", backend)
    side = 32 if DEVICE.type == "cpu" else 96  # the interpreter and the emulation are slow
    inputs = [torch.randn(1, 3, side, side + 8 * i, device=DEVICE) for i in range(THREADS)]

    def work(i):
        with torch.inference_mode():
            return model(inputs[i])

    outputs = run_in_threads(work)
    with torch.no_grad():
        for x, out in zip(inputs, outputs):
            assert_close_relative(out, reference_model(x.double().cpu()), rtol=1e-3)


# ---------------------------------------------------------------------------------------- streams, devices
@needs_gpu
@pytest.mark.parametrize("op", ["dwconv_bn_act", "squeeze_excite"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ops_run_on_the_current_stream(backend, op, poisoned_outputs):
    """On a side stream that is still busy writing x, the op must queue behind that write: a kernel launched on
    another stream would read x's NaN poison. Only the side stream's own event orders the check after it."""
    source = torch.randn(8, 48, 56, 56, device="cuda")
    weight, bias = dwconv_args(source)
    se = se_args(source, 12)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.full_like(source, float("nan"))
        torch.cuda._sleep(100_000_000)  # keeps the side stream busy for tens of milliseconds
        x.copy_(source)
        if op == "dwconv_bn_act":
            out = ops.dwconv_bn_act(x, weight, bias, backend=backend)
        else:
            out = ops.squeeze_excite(x, *se, "relu", "hardsigmoid", backend)
        done = torch.cuda.Event()
        done.record(side)
    torch.cuda.current_stream().wait_event(done)
    if op == "dwconv_bn_act":
        reference = dwconv64(source, weight, bias, [1, 1], [1, 1], [1, 1], "hardswish")
    else:
        reference = se64(source, *se, "relu", "hardsigmoid")
    assert_close_to_reference(out, reference, torch.float32)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA GPU")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ops_follow_the_input_device(backend, poisoned_outputs):
    """Inputs on cuda:1 while cuda:0 is current: the kernels run there and the output stays there."""
    with torch.cuda.device(0):
        x = torch.randn(3, 24, 17, 19, device="cuda:1")
        weight, bias = dwconv_args(x)
        se = se_args(x, 6)
        y = ops.dwconv_bn_act(x, weight, bias, stride=2, backend=backend)
        z = ops.squeeze_excite(x, *se, "relu", "sigmoid", backend)
        assert torch.cuda.current_device() == 0
    assert y.device == z.device == torch.device("cuda:1")
    assert_close_to_reference(y, dwconv64(x, weight, bias, [2, 2], [1, 1], [1, 1], "hardswish"),
                              torch.float32)
    assert_close_to_reference(z, se64(x, *se, "relu", "sigmoid"), torch.float32)


# --------------------------------------------------------------------------------- CUDA graphs, compile
@needs_gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_patched_model_captures_into_a_cuda_graph(backend, mobilenet, monkeypatch):
    """Captured once, replayed with new inputs copied into the static input: each replay matches stock."""
    monkeypatch.setenv("MBKERNELS_BACKEND", backend)
    stock, model = (copy.deepcopy(m).cuda() for m in mobilenet)
    static_input = torch.randn(4, 3, 96, 96, device="cuda")
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: first calls compile and fold weights
            for _ in range(2):
                model(static_input)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = model(static_input)
        for seed in range(3):
            x = torch.randn(4, 3, 96, 96, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            static_input.copy_(x)
            graph.replay()
            assert_close_relative(static_output, stock(x), rtol=1e-3)


@needs_gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_patched_model_under_reduce_overhead_compile(backend, mobilenet, monkeypatch):
    """torch.compile(mode="reduce-overhead") (CUDA graphs through inductor): new inputs, outputs match stock."""
    monkeypatch.setenv("MBKERNELS_BACKEND", backend)
    torch._dynamo.reset()
    stock, model = (copy.deepcopy(m).cuda() for m in mobilenet)
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for seed in range(4):  # the first calls record, later ones replay
            x = torch.randn(4, 3, 96, 96, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            out = compiled(x).clone()  # the graph's output buffer is reused by the next replay
            assert_close_relative(out, stock(x), rtol=1e-3)


# ------------------------------------------------------------------------------------ 64-bit indexing
# 1784 images of 96 x 112 x 112: 2,148,335,616 elements, just over 2**31, so the last image sits past the int32
# limit. (N=512 of that size is 6.2e8 elements, under the limit.)
HUGE_SHAPE = (1784, 96, 112, 112)
HUGE_CHUNK = 32  # images per float64 reference chunk


def huge_input(memory_format) -> torch.Tensor:
    n, c, h, w = HUGE_SHAPE
    needed = 2 * n * c * h * w * 2 + 4 * HUGE_CHUNK * c * h * w * 8  # x and out in float16, float64 chunk work
    free, _ = torch.cuda.mem_get_info()
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.empty(HUGE_SHAPE, dtype=torch.float16, device="cuda", memory_format=memory_format)
    return x.normal_(generator=torch.Generator("cuda").manual_seed(0))


def check_huge_output(out: torch.Tensor, reference_of) -> None:
    """Every element written (the poisoned NaN gone, checked on the GPU), and the first images, middle images and
    the last images -- those past the 2**31-element mark -- against the float64 reference."""
    assert not out.isnan().any(), f"{int(out.isnan().sum())} output elements are NaN (never written?)"
    n = HUGE_SHAPE[0]
    beyond_int32 = 2**31 // (out.numel() // n)  # the first image with elements past offset 2**31
    assert beyond_int32 >= n - HUGE_CHUNK
    for start in (0, n // 2, n - HUGE_CHUNK):
        chunk = slice(start, start + HUGE_CHUNK)
        assert_close_to_reference(out[chunk], reference_of(chunk), torch.float16)


@needs_gpu
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dwconv_beyond_int32_indexing(backend, memory_format, poisoned_outputs):
    x = huge_input(memory_format)
    assert x.numel() > 2**31
    weight, bias = dwconv_args(x)
    out = ops.dwconv_bn_act(x, weight, bias, activation="hardswish", backend=backend)
    check_huge_output(out, lambda chunk: dwconv64(x[chunk], weight, bias, [1, 1], [1, 1], [1, 1],
                                                          "hardswish"))


@needs_gpu
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_squeeze_excite_beyond_int32_indexing(backend, memory_format, poisoned_outputs):
    x = huge_input(memory_format)
    se = se_args(x, 24)
    out = ops.squeeze_excite(x, *se, "relu", "hardsigmoid", backend)
    check_huge_output(out, lambda chunk: se64(x[chunk], *se, "relu", "hardsigmoid"))
