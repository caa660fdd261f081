"""Shared test settings: where the kernels run, poisoned outputs, tolerances that travel with the dtype.

Without a GPU, the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set here before any kernel
module is imported) and the CUDA kernels through their host emulation (the CPU kernels of mbkernels._C).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # One intra-op thread: on 2 shared cores torch's thread pool spins and small float64 references take seconds.
    torch.set_num_threads(1)

import zlib  # noqa: E402

import pytest  # noqa: E402

import mbkernels  # noqa: E402

HAS_GPU = torch.cuda.is_available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")

# Max elementwise error allowed, relative to the element and to the largest reference value (float64 reference).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def backend_unavailable(name: str):
    """Why `name` cannot be tested here (None: it can)."""
    status = mbkernels.backend_status()[name]
    return None if status.available else status.reason


def backend_params(*names):
    """pytest params for backends, skipped with the backend's own reason where it is off."""
    params = []
    for name in names:
        reason = backend_unavailable(name)
        marks = [pytest.mark.skip(reason=f"{name} backend unavailable: {reason}")] if reason else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


KERNEL_BACKENDS = backend_params("cuda", "triton")
ALL_BACKENDS = backend_params("cuda", "triton", "reference")


def assert_close_to_reference(out: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    """Every element within TOLERANCE[dtype] of the float64 reference; NaN (a poisoned, unwritten element) fails."""
    assert out.shape == reference.shape, f"shape {tuple(out.shape)} != reference {tuple(reference.shape)}"
    assert out.dtype == dtype, f"dtype {out.dtype} != {dtype}"
    got = out.detach().to(torch.float64).cpu()
    want = reference.detach().to(torch.float64).cpu()
    assert not torch.isnan(got).any(), f"{int(torch.isnan(got).sum())} output elements are NaN (never written?)"
    tol = TOLERANCE[dtype]
    scale = max(want.abs().max().item(), 1e-6)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)


@pytest.fixture
def poisoned_outputs():
    """Every torch.empty in the ops fills with NaN, so elements a kernel fails to write show up."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = was_filling


@pytest.fixture
def op_calls(monkeypatch):
    """Every op call a fused module makes, as (op name, the arguments it was planned with): the plans of
    mbkernels.ops.prepare, wrapped to record each call."""
    calls = []
    prepare = mbkernels.ops.prepare

    def recording(op, *values):
        plan = prepare(op, *values)
        return lambda x: calls.append((op, values)) or plan(x)

    monkeypatch.setattr(mbkernels.ops, "prepare", recording)
    return calls


@pytest.fixture(autouse=True)
def _no_tf32():
    """References on the GPU run in full float32."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random data in every test, the same on every run of that test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def random_x(shape, dtype=torch.float32, layout="nchw", device=DEVICE) -> torch.Tensor:
    """A random input in one of LAYOUTS (never zeros: they hide unwritten or misread elements)."""
    return torch.randn(shape, device=device).to(dtype).contiguous(memory_format=LAYOUTS[layout])
