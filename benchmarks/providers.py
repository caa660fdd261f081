"""The things compared: stock layers and models, their float64 references, and each provider's callable.

Layer providers: eager (the stock modules), compile (torch.compile of them, inductor freezing on so BN folds
into the conv), mbkernels-<backend> (the public op with weights folded once, as a patched model runs it).
Model providers: eager, compile, patched, patched+compile, patched+tuned (patched with the case's input as the
example: every choice timed on this device) and patched+tuned+compile, and at batch 1 compile-reduce-overhead
(inductor's CUDA graphs) against patched-cudagraph (the patched model captured in one torch.cuda.CUDAGraph).
"""
import copy
from typing import Callable, Optional

import torch
from torch import nn

import mbkernels
from mbkernels.match import randomize_batchnorm
from mbkernels import _contract, activations

from .cases import LayerCase, ModelCase, compile_mode

LAYER_PROVIDERS_GPU = ("eager", "compile", "mbkernels-cuda", "mbkernels-triton")
LAYER_PROVIDERS_CPU = ("eager", "mbkernels-reference")
# patched: the planner's choice per block; patched-layers: layer fusion only; patched-blocks: every block fused.
MODEL_PROVIDERS_GPU = ("eager", "compile", "patched", "patched+compile", "patched+tuned", "patched+tuned+compile",
                       "patched-layers", "patched-blocks")
MODEL_PROVIDERS_BATCH1 = ("compile-reduce-overhead", "patched-cudagraph")
MODEL_PROVIDERS_CPU = ("eager", "patched-reference", "patched+tuned")
COMPILING_PROVIDERS = ("compile", "patched+compile", "patched+tuned+compile", "compile-reduce-overhead")

# Largest error allowed, relative to the largest reference value (float64 reference). Loose next to the unit
# tests' bounds (tests/ check the kernels precisely): here they catch a wrong kernel before it is timed.
# Each record keeps the error it measured (max_rel_err), to tighten these from.
LAYER_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}
MODEL_TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-2}

_MODULE_OF_GATE = {name: cls for cls, name in activations.GATE_MODULES.items()}


# ------------------------------------------------------------------------------------------ stock modules
def stock_layer(case: LayerCase, generator: torch.Generator) -> nn.Module:
    """The float32 CPU stock module of a layer case, in eval mode with random weights and statistics."""
    g = case.get
    if case.op == "dwconv_bn_act":
        channels = g("channels")
        conv = nn.Conv2d(channels, channels, g("kernel"), g("stride"), g("padding"), g("dilation"),
                         groups=channels, bias=False)
        module = nn.Sequential(conv, nn.BatchNorm2d(channels), activations.stock_module(g("activation")))
        randomize_batchnorm(module, generator)
    else:
        from timm.models._efficientnet_blocks import SqueezeExcite

        module = SqueezeExcite(g("channels"), rd_channels=g("reduced"),
                               act_layer=lambda **_: activations.stock_module(g("activation")),
                               gate_layer=_MODULE_OF_GATE[g("gate")])
    return module.eval()


def stock_model(name: str, generator: torch.Generator) -> nn.Module:
    import timm

    return randomize_batchnorm(timm.create_model(name, pretrained=False), generator).eval()


def on_device(module: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    module = copy.deepcopy(module).to(device=device, dtype=dtype)
    return module.to(memory_format=torch.channels_last) if channels_last else module


def make_inputs(shape: tuple, dtype: torch.dtype, channels_last: bool, device: torch.device, count: int,
                seed: int = 0) -> list:
    """`count` random input tensors, views of one allocation drawn on the device, each contiguous in the
    requested layout."""
    n, c, h, w = shape
    generator = torch.Generator(device=device).manual_seed(seed)
    data = torch.randn((count * n, h, w, c) if channels_last else (count * n, c, h, w), generator=generator,
                       device=device, dtype=dtype)
    if channels_last:
        data = data.permute(0, 3, 1, 2)
    return [data[i * n:(i + 1) * n] for i in range(count)]


# -------------------------------------------------------------------------------------------- providers
def compiled(module: nn.Module, mode: Optional[str], example: torch.Tensor) -> Callable:
    """torch.compile(module) with inductor freezing, compiled (and autotuned) now on `example`.

    dynamo is reset first: every case compiles a fresh module whose forward shares its code object with the
    previous cases', and past the recompile limit dynamo would silently run it eagerly.
    """
    torch._dynamo.reset()
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        fn = torch.compile(module, mode=mode, fullgraph=True, dynamic=False)
        fn(example)
    return fn


def layer_provider(provider: str, case: LayerCase, module: nn.Module, example: torch.Tensor) -> Callable:
    """The callable `provider` runs for a layer case; `module` is the stock module on x's device and dtype."""
    if provider == "eager":
        return module
    if provider == "compile":
        return compiled(module, compile_mode(case), example)
    # The package's own fused modules: they fold once and call the op as a patched model does.
    backend = provider.removeprefix("mbkernels-")
    if case.op == "dwconv_bn_act":
        return mbkernels.nn.DWConvBNAct(*module, backend=backend).eval()
    return mbkernels.nn.SqueezeExcite.from_module(module, backend=backend).eval()


def cuda_graphed(module: nn.Module, example: torch.Tensor) -> Callable:
    """module captured in one CUDA graph on a static copy of example; each call copies x in and replays."""
    static_input = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # warm-up off the capture stream: lazy init, caches, Triton compilation
            module(static_input)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_output = module(static_input)

    def replay(x):
        static_input.copy_(x)
        graph.replay()
        return static_output

    return replay


def _reduce_overhead(model: nn.Module, example: torch.Tensor) -> Callable:
    fn = compiled(model, "reduce-overhead", example)

    def step(x):
        torch.compiler.cudagraph_mark_step_begin()  # each call is a new inference step for cudagraph trees
        return fn(x)

    return step


def patched(model: nn.Module, backend: Optional[str] = None, blocks=True, example=None) -> nn.Module:
    return mbkernels.patch(copy.deepcopy(model), backend=backend, blocks=blocks, example_inputs=example)


def model_provider(provider: str, case: ModelCase, model: nn.Module, example: torch.Tensor) -> Callable:
    """The callable `provider` runs for a model case; `model` is the stock model on x's device and dtype."""
    if provider == "eager":
        return model
    if provider == "compile":
        return compiled(model, compile_mode(case), example)
    if provider == "patched":
        return patched(model)
    if provider == "patched-layers":
        return patched(model, blocks=False)
    if provider == "patched-blocks":
        return patched(model, blocks="all")
    if provider == "patched-reference":
        return patched(model, backend="reference")
    if provider == "patched+compile":
        return compiled(patched(model), compile_mode(case), example)
    if provider == "patched+tuned":
        return patched(model, example=example)
    if provider == "patched+tuned+compile":
        return compiled(patched(model, example=example), compile_mode(case), example)
    if provider == "compile-reduce-overhead":
        return _reduce_overhead(model, example)
    if provider == "patched-cudagraph":
        return cuda_graphed(patched(model), example)
    raise ValueError(f"unknown model provider {provider!r}")


# ------------------------------------------------------------------------------------------ correctness
def check_output(out: torch.Tensor, expected: torch.Tensor, like: torch.Tensor, tolerance: float) -> float:
    """Raise AssertionError unless out has like's shape, dtype and layout and lies within tolerance of the
    float64 `expected` (max error over max |expected|); return that relative error."""
    assert isinstance(out, torch.Tensor), f"the provider returned {type(out).__name__}, not a Tensor"
    assert out.shape == expected.shape, f"shape {tuple(out.shape)} != reference {tuple(expected.shape)}"
    assert out.dtype == like.dtype, f"dtype {out.dtype} != input dtype {like.dtype}"
    if like.dim() == 4 and _contract.memory_format_of(like) == torch.channels_last and out.dim() == 4:
        assert out.is_contiguous(memory_format=torch.channels_last), "output is not channels_last like x"
    got = out.detach().to(torch.float64)
    assert torch.isfinite(got).all(), f"{int((~torch.isfinite(got)).sum())} output elements are not finite"
    scale = expected.abs().max().item()
    assert scale > 0, "the reference output is all zeros: the case cannot tell a right kernel from a wrong one"
    error = (got - expected).abs().max().item() / scale
    assert error <= tolerance, f"max error {error:.3g} of the largest reference value exceeds {tolerance:.0e}"
    return error
