"""Patched models under torch.compile, torch.export and AOTInductor, and what their forward does per call.

- Fold once: no folding arithmetic in a traced graph (a patched model's dynamo graph is no larger than stock's);
  the folded buffers follow load_state_dict and refresh() also in compiled code.
- Compile sees through: on the CPU (reference backend) the compiled graph holds aten ops, no mbkernels op; under
  the Triton interpreter the op stays whole.
- Export: the exported graph holds the mbkernels ops; its AOTInductor package runs from Python (and from C++:
  .ci/wheel_and_cmake.sh, tests/cpp/run_package.cpp).
- Per call: the fused forward dispatches nothing but its op (no folding, no .item(), no host tensors); on a GPU
  the patched model captures in one CUDA graph and under reduce-overhead.
Every output is compared with the stock model in float64, on random BatchNorm statistics.
"""
import copy

import pytest
import timm
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode

import mbkernels
from mbkernels.nn import DWConvBNAct, FusedModule, SqueezeExcite
from mbkernels.match import randomize_batchnorm
from tests.conftest import DEVICE, HAS_GPU, assert_close_to_reference
from tests.models.mobilenetv3 import mobilenetv3_small

needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need a CUDA GPU")


def _models(seed: int = 0, device=DEVICE, **patch_options):
    """(stock float64 reference, stock float32, patched float32) of the hand-written MobileNetV3-Small."""
    torch.manual_seed(seed)
    stock = randomize_batchnorm(mobilenetv3_small().eval(), torch.Generator().manual_seed(seed)).to(device)
    # Layer fusion: its ops have C++ kernels (AOTInductor packages run from C++); the block op is Python-only.
    patched = mbkernels.patch(copy.deepcopy(stock), **{"blocks": False, **patch_options})
    return copy.deepcopy(stock).double(), stock, patched


def _image(batch: int = 2, size: int = 40, device=DEVICE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size + 3, device=device) * 2


def _assert_matches(model, reference64, x) -> None:
    with torch.no_grad():
        assert_close_to_reference(model(x), reference64(x.double()), torch.float32)


def _graph_ops(graph) -> list[str]:
    return [str(node.target) for node in graph.nodes if node.op == "call_function"]


def _count(ops: list[str], name: str) -> int:
    """Calls of torch.ops.mbkernels.<name> (dynamo records the packet, AOTDispatcher the overload)."""
    return sum(op in (f"mbkernels.{name}", f"mbkernels.{name}.default") for op in ops)


def _aot_graphs(model, x) -> list:
    """The graphs AOTDispatcher hands to the compiler when model(x) is compiled (what Inductor would get)."""
    graphs = []

    def keep(graph_module, example_inputs):
        graphs.append(graph_module.graph)
        return graph_module.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=aot_autograd(fw_compiler=keep), fullgraph=True)(x)
    return graphs, out


# ------------------------------------------------------------------------------------------------ fold once
def test_dynamo_graph_of_patched_timm_model_is_no_larger_than_stock():
    stock = randomize_batchnorm(timm.create_model("mobilenetv3_large_100").eval())
    patched = mbkernels.patch(copy.deepcopy(stock), blocks=False)
    sizes, graphs = {}, {}
    x = torch.randn(1, 3, 32, 32)
    for name, model in (("stock", stock), ("patched", patched)):
        def count(graph_module, example_inputs, name=name):
            sizes[name] = len(graph_module.graph.nodes)
            graphs[name] = _graph_ops(graph_module.graph)
            return graph_module.forward

        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend=count, fullgraph=True)(x)
    assert sizes["patched"] <= sizes["stock"], sizes
    assert _count(graphs["patched"], "dwconv_bn_act") == 15
    folding = [op for op in graphs["patched"] if "rsqrt" in op or "zeros" in op]
    assert not folding, f"folding arithmetic in the patched graph: {folding}"


def test_folded_weights_are_float32_buffers_outside_the_state_dict():
    _, stock, patched = _models()
    fused = [m for m in patched.modules() if isinstance(m, (DWConvBNAct, SqueezeExcite))]
    assert fused
    for module in fused:
        names = [name for name, b in module.named_buffers(recurse=False) if b is not None]
        assert names and all(name.startswith("folded_") for name in names)
        assert all(getattr(module, name).dtype == torch.float32 for name in names)
    assert patched.state_dict().keys() == stock.state_dict().keys()
    patched.half()
    assert all(b.dtype == torch.float32 for m in fused for n, b in m.named_buffers(recurse=False)
               if b is not None and n.startswith("folded_"))


def test_compiled_model_follows_load_state_dict_and_refresh():
    reference64, stock, patched = _models(seed=1)
    x = _image()
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    _assert_matches(compiled, reference64, x)

    other64, other, _ = _models(seed=2)
    patched.load_state_dict(other.state_dict())
    _assert_matches(compiled, other64, x)

    with torch.no_grad():  # .data edits bump no version counter: refresh() tells the fused modules
        for model in (patched, other64):
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.data += 0.5
                    module.weight.data *= -1.25
    for module in patched.modules():
        if isinstance(module, FusedModule):
            module.refresh()
    _assert_matches(compiled, other64, x)


# -------------------------------------------------------------------------------------- compile sees through
def test_compiled_graph_on_the_cpu_holds_aten_ops_not_mbkernels_ops():
    reference64, _, patched = _models(device="cpu")
    x = _image(device="cpu")
    graphs, out = _aot_graphs(patched, x)
    ops = [op for graph in graphs for op in _graph_ops(graph)]
    assert not [op for op in ops if "mbkernels" in op], "an mbkernels op stayed opaque on the CPU"
    assert "aten.convolution.default" in ops
    assert_close_to_reference(out, reference64(x.double()), torch.float32)


def test_inductor_compiled_patched_model_matches_stock():
    reference64, _, patched = _models(device="cpu", seed=3)
    x = _image(device="cpu")
    torch._dynamo.reset()
    _assert_matches(torch.compile(patched), reference64, x)


@pytest.mark.skipif(HAS_GPU or not mbkernels.backend_status()["triton"].available, reason="the Triton interpreter on CPU")
def test_op_stays_whole_when_triton_interprets():
    reference64, _, patched = _models(device="cpu", backend="triton")
    x = _image(batch=1, size=24, device="cpu")
    graphs, out = _aot_graphs(patched, x)
    ops = [op for graph in graphs for op in _graph_ops(graph)]
    assert _count(ops, "dwconv_bn_act") and _count(ops, "squeeze_excite")
    assert_close_to_reference(out, reference64(x.double()), torch.float32)


# ---------------------------------------------------------------------------------------- export, AOTInductor
def test_export_keeps_the_ops_and_the_aoti_package_runs_from_python(tmp_path):
    reference64, _, patched = _models(device="cpu", seed=4)
    x = _image(device="cpu")
    with torch.no_grad():
        exported = torch.export.export(patched, (x,))
    ops = _graph_ops(exported.graph)
    assert _count(ops, "dwconv_bn_act") == 11 and _count(ops, "squeeze_excite") == 10
    assert not [op for op in ops if "rsqrt" in op], "folding arithmetic in the exported graph"
    package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "patched.pt2"))
    loaded = torch._inductor.aoti_load_package(package)
    fresh = _image(device="cpu")  # not the example input
    assert_close_to_reference(loaded(fresh), reference64(fresh.double()), torch.float32)


# ------------------------------------------------------------------------------------------------- per call
class _DispatchLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["dwconv", "se"])
def test_fused_forward_dispatches_only_its_op(kind):
    _, _, patched = _models(device="cpu")
    module_type, op = {"dwconv": (DWConvBNAct, "mbkernels.dwconv_bn_act.default"),
                       "se": (SqueezeExcite, "mbkernels.squeeze_excite.default")}[kind]
    module = next(m for m in patched.modules() if isinstance(m, module_type))
    channels = module.conv.in_channels if kind == "dwconv" else module.reduce_layer.weight.shape[1]
    x = torch.randn(2, channels, 9, 11)
    with torch.no_grad():
        module(x)  # the first call may refold (nothing has changed, so it does not)
        with _DispatchLog() as log:
            module(x)
    # No folding, no .item() (aten._local_scalar_dense), no host tensor created: the op and nothing else.
    assert log.ops == [op], log.ops


@needs_gpu
def test_patched_model_captures_in_one_cuda_graph():
    reference64, _, patched = _models(device="cuda")
    static_x = _image(device="cuda")
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            patched(static_x)  # warm-up: Triton compiles, the allocator sets up
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = patched(static_x)
        fresh = _image(device="cuda")
        static_x.copy_(fresh)
        graph.replay()
    torch.cuda.synchronize()
    assert_close_to_reference(static_out, reference64(fresh.double()), torch.float32)


@needs_gpu
def test_patched_model_under_reduce_overhead():
    reference64, _, patched = _models(device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(patched, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):  # the third call replays the recorded CUDA graph
            x = _image(device="cuda")
            out = compiled(x).clone()
    assert_close_to_reference(out, reference64(x.double()), torch.float32)
