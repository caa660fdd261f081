"""The public ops: the functions users call and their registered custom ops (`torch.ops.mbkernels.<name>`).

Each public op is one custom op whose fake kernel (the contract's output allocation) lets
torch.compile(fullgraph=True) and torch.export trace it; its real kernel checks and normalises the arguments once
(mbkernels._contract) and hands the bundle to the backend that `dispatch.select` picks. Plain eager calls of the
public functions run that same implementation without the custom-op dispatch (see plain_eager_call). Compiled
graphs get the chosen backend's own ops in its place (see _seen_through); exported graphs keep it whole.
"""
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import _native, backends as _backends, dispatch  # _native first: it loads mbkernels._C
from ._contract import CONTRACTS, DWConvArgs, IntOrPair, SEArgs, check_x, memory_format_of, pair, padding4
from .backends.triton import interpreting as triton_interpreting

_native_op_kernels = []  # the Library holding our kernels for ops the native library defined (see _register)


def plain_eager_state() -> bool:
    """Outside any compiling, tracing or dispatch mode: what a plain eager call needs beside its tensors."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None)


def plain_eager_call(*tensors: Optional[Tensor]) -> bool:
    """True for a call on plain tensors outside any tracing, compiling or autograd recording: the public functions
    then run the op's implementation directly, skipping the custom-op dispatch (tens of microseconds a call, which
    matters at batch 1). Every other call goes through the registered op, so it is traced as one node (and refuses
    backward, which the op does not implement)."""
    present = [t for t in tensors if t is not None]
    if not all(type(t) in (Tensor, torch.nn.Parameter) for t in present):
        return False
    if not plain_eager_state():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


def _run(op: str, args, backend: str) -> Tensor:
    """Check, normalise, dispatch: the one implementation behind every public op."""
    contract = CONTRACTS[op]
    contract.check(args)
    if args.x.numel() == 0:
        return contract.output(args)
    args = contract.normalise(args)
    return dispatch.select(op, backend, args)(args)


def prepare(op: str, *values) -> Callable[[Tensor], Tensor]:
    """The registered op's implementation for its arguments `values` (x first, the backend name last), with the
    checks, normalisation and backend choice made once: the callable runs the op on any x of values[0]'s shape,
    dtype, device and layout (the fused modules keep one per input signature for their plain eager calls)."""
    contract = CONTRACTS[op]
    args = contract.bundle(*values[:-1])
    contract.check(args)
    if args.x.numel() == 0:
        template = args._replace(x=None)
        return lambda x: contract.output(template._replace(x=x))
    args = contract.normalise(args)
    run = dispatch.select(op, values[-1], args)
    prepare = _backend_of(op, run).ops[op].prepare
    if prepare is not None and args.x is values[0]:  # x needs no normalising: the backend's own plan, if it has one
        planned = prepare(args)
        if planned is not None:
            return planned
    layout, template = memory_format_of(args.x), args._replace(x=None)  # the plan keeps no input alive
    return lambda x: run(template._replace(x=x.contiguous(memory_format=layout)))


def _backend_of(op: str, run):
    """The backend whose run function for op is `run` (what dispatch.select returned)."""
    return next(b for b in _backends.declared() if op in b.ops and b.ops[op].run is run)


def _seen_through(op: str, args, backend: str):
    """What traced graphs (torch.compile, AOTInductor) get in place of the op: the run function of the backend
    that would run it, traced, so that Inductor optimises the reference backend's aten ops with their neighbours
    (the CPU), compiles the Triton kernels into its own code, and calls the CUDA kernels' op directly; None where
    the op stays whole. It stays whole in exported graphs (high-level, serialisable: the mbkernels ops), in
    AOTInductor packages where the reference backend would run it (libmbkernels' CPU kernels run it there, see
    csrc/public_ops.cpp), for empty inputs, and where Triton runs under its interpreter, which cannot take the
    fake tensors of tracing."""
    from torch._inductor.virtualized import V

    if not getattr(torch._functorch.config, "decompose_custom_triton_ops", True):  # torch.export sets it off
        return None
    contract = CONTRACTS[op]
    contract.check(args)
    if args.x.numel() == 0:
        return None
    args = contract.normalise(args)
    run = dispatch.select(op, backend, args)
    chosen = _backend_of(op, run).name
    if (chosen == "triton" and triton_interpreting()) or (chosen == "reference" and V.aot_compilation):
        return None
    return lambda: run(args)


def _register(op: str, function) -> None:
    """Make function torch.ops.mbkernels.<op>: its implementation on CPU and CUDA tensors, the contract's output
    as its fake kernel, and what AOTDispatcher (torch.compile, AOTInductor) traces in its place (_seen_through).

    Where the native library defined the op (csrc/public_ops.cpp, in mbkernels._C; C++ programs run its C++
    kernels), function becomes its kernel for Python callers; otherwise it is defined here as a custom op."""
    contract = CONTRACTS[op]
    qualname = f"mbkernels::{op}"
    if hasattr(torch.ops.mbkernels, op):
        if not _native_op_kernels:
            _native_op_kernels.append(torch.library.Library("mbkernels", "IMPL"))
        for key in ("CPU", "CUDA"):
            _native_op_kernels[0].impl(op, function, key)
    else:
        torch.library.custom_op(qualname, function, mutates_args=())

    @torch.library.register_fake(qualname)
    def _(*values):
        args = contract.bundle(*values[:-1])
        contract.check(args)
        return contract.output(args)

    @torch.library.register_torch_dispatch(qualname, FunctionalTensorMode)
    def _(mode, func, types, values, kwargs):
        with mode:  # the checks and normalisation are traced too (on FunctionalTensors, they need the mode)
            traced = _seen_through(op, contract.bundle(*values[:-1]), values[-1])
            if traced is not None:
                return traced()
        return mode.__torch_dispatch__(func, types, values, kwargs)


# ----------------------------------------------------------------------------- depthwise conv + BN + act
def _dwconv_bn_act_op(x: Tensor, weight: Tensor, bias: Tensor, stride: list[int], padding: list[int],
                      dilation: list[int], activation: str, backend: str) -> Tensor:
    args = CONTRACTS["dwconv_bn_act"].bundle(x, weight, bias, stride, padding, dilation, activation)
    return _run("dwconv_bn_act", args, backend)


_register("dwconv_bn_act", _dwconv_bn_act_op)


def dwconv_bn_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    stride: IntOrPair = 1,
    padding: Optional[Union[int, Sequence[int]]] = None,
    dilation: IntOrPair = 1,
    activation: str = "hardswish",
    backend: Optional[str] = None,
) -> Tensor:
    """act(conv2d(x, weight, bias, stride, padding, dilation, groups=C)) in one pass over memory.

    weight [C * M, 1, kh, kw] (M: the depth multiplier, usually 1) and bias [C * M] carry the folded BatchNorm (see
    `fold_bn`). padding: an int, [h, w], or [top, bottom, left, right]; None pads by dilation * (k // 2), which
    keeps the plane's size at stride 1. activation: a name of mbkernels.activations.ACTIVATIONS, with a parameter
    where it takes one ("leaky_relu:0.2"). The output has x's dtype and memory format.
    """
    check_x(x)
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    if padding is None:
        if not isinstance(weight, Tensor) or weight.dim() != 4:
            CONTRACTS["dwconv_bn_act"].check(DWConvArgs(x, weight, bias, stride, [0] * 4, dilation, activation))
        padding = [dilation[0] * (weight.shape[2] // 2), dilation[1] * (weight.shape[3] // 2)]
    args = (x, weight, bias, stride, padding4(padding), dilation, activation, backend or "")
    if plain_eager_call(x, weight, bias):
        return _dwconv_bn_act_op(*args)
    return torch.ops.mbkernels.dwconv_bn_act(*args)


@torch.no_grad()
def fold_bn(conv: torch.nn.Conv2d, bn: Optional[torch.nn.BatchNorm2d]) -> tuple[Tensor, Tensor]:
    """The float32 (weight, bias) of conv followed by eval-mode bn, as one conv.

    bn may be None (the conv's own weight and bias, or zeros). BatchNorm without running statistics
    normalises with batch statistics and cannot be folded.
    """
    weight = conv.weight.to(torch.float32)
    if conv.bias is not None:
        bias = conv.bias.to(torch.float32)
    else:
        bias = torch.zeros(conv.out_channels, dtype=torch.float32, device=weight.device)
    if bn is None:
        return weight.contiguous(), bias.contiguous()
    return fold_bn_into(weight, bias, bn)


@torch.no_grad()
def fold_bn_into(weight: Tensor, bias: Tensor, bn: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """(weight, bias) of a layer (a conv [O, ...] or a linear [O, I]) followed by eval-mode bn (a BatchNorm of O
    features), as one layer, computed in weight's dtype."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn has no running statistics (track_running_stats=False) and cannot be folded")
    if bn.num_features != weight.shape[0]:
        raise ValueError(f"bn has {bn.num_features} features but conv has {weight.shape[0]} output channels")
    dtype = weight.dtype
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -bn.running_mean.to(dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    folded_weight = weight * scale.reshape(-1, *[1] * (weight.dim() - 1))
    folded_bias = bias.to(dtype) * scale + shift
    return folded_weight.contiguous(), folded_bias.contiguous()


# -------------------------------------------------------------------------------------- squeeze-excite
def _squeeze_excite_op(x: Tensor, w_reduce: Tensor, b_reduce: Optional[Tensor], w_expand: Tensor,
                       b_expand: Optional[Tensor], activation: str, gate: str, backend: str) -> Tensor:
    return _run("squeeze_excite", SEArgs(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate), backend)


_register("squeeze_excite", _squeeze_excite_op)


def squeeze_excite(
    x: Tensor,
    w_reduce: Tensor,
    b_reduce: Optional[Tensor],
    w_expand: Tensor,
    b_expand: Optional[Tensor],
    activation: str = "relu",
    gate: str = "hardsigmoid",
    backend: Optional[str] = None,
) -> Tensor:
    """x * gate(w_expand @ act(w_reduce @ mean_hw(x) + b_reduce) + b_expand), the gate broadcast over H, W.

    w_reduce is [R, C] and w_expand [C, R] (1x1-conv weights [R, C, 1, 1] / [C, R, 1, 1] also do); biases
    may be None. The pooled mean and the MLP run in float32; the output has x's dtype and memory format.
    """
    check_x(x)
    args = (x, w_reduce, b_reduce, w_expand, b_expand, activation, gate, backend or "")
    if plain_eager_call(x, w_reduce, b_reduce, w_expand, b_expand):
        return _squeeze_excite_op(*args)
    return torch.ops.mbkernels.squeeze_excite(*args)


# ----------------------------------------------------------------------------- inverted-residual block
def _inverted_residual_op(x: Tensor, w_expand: Optional[Tensor], b_expand: Optional[Tensor], expand_activation: str,
                          w_dw: Tensor, b_dw: Tensor, stride: list[int], padding: list[int], dilation: list[int],
                          dw_activation: str, w_se_reduce: Optional[Tensor], b_se_reduce: Optional[Tensor],
                          w_se_expand: Optional[Tensor], b_se_expand: Optional[Tensor], se_activation: str,
                          se_gate: str, post_se_activation: str, w_project: Tensor, b_project: Tensor,
                          project_activation: str, residual: bool, backend: str) -> Tensor:
    args = CONTRACTS["inverted_residual"].bundle(
        x, w_expand, b_expand, expand_activation, w_dw, b_dw, stride, padding, dilation, dw_activation,
        w_se_reduce, b_se_reduce, w_se_expand, b_se_expand, se_activation, se_gate, post_se_activation,
        w_project, b_project, project_activation, residual)
    return _run("inverted_residual", args, backend)


_register("inverted_residual", _inverted_residual_op)


def inverted_residual(
    x: Tensor,
    w_dw: Tensor,
    b_dw: Tensor,
    w_project: Tensor,
    b_project: Tensor,
    *,
    w_expand: Optional[Tensor] = None,
    b_expand: Optional[Tensor] = None,
    expand_activation: str = "relu",
    stride: IntOrPair = 1,
    padding: Optional[Union[int, Sequence[int]]] = None,
    dilation: IntOrPair = 1,
    dw_activation: str = "relu",
    se: Optional[Sequence[Optional[Tensor]]] = None,
    se_activation: str = "relu",
    se_gate: str = "sigmoid",
    post_se_activation: str = "identity",
    project_activation: str = "identity",
    residual: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """A whole inverted-residual block, every BN folded into its conv (see `fold_bn`), in one or two passes:

        h = expand_activation(w_expand @ x + b_expand)        (h = x when w_expand is None)
        d = dw_activation(depthwise_conv2d(h, w_dw, b_dw, stride, padding, dilation))
        d = post_se_activation(d * gate(...))                 (se = (w_reduce, b_reduce, w_expand, b_expand))
        y = project_activation(w_project @ d + b_project) + (x if residual else 0)

    w_expand [E, C], w_dw [E, 1, kh, kw], w_project [O, E] (1x1 conv weights [E, C, 1, 1] also do); the SE's
    weights as squeeze_excite takes them ([R, E], [R], [E, R], [E]; biases may be None). padding: an int, [h, w]
    or [top, bottom, left, right]; None pads by dilation * (k // 2). The output has x's dtype and memory format.
    """
    check_x(x)
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    if padding is None:
        if not isinstance(w_dw, Tensor) or w_dw.dim() != 4:
            raise ValueError(f"w_dw must be a depthwise weight [E, 1, kh, kw], got "
                             f"{tuple(w_dw.shape) if isinstance(w_dw, Tensor) else type(w_dw).__name__}")
        padding = [dilation[0] * (w_dw.shape[2] // 2), dilation[1] * (w_dw.shape[3] // 2)]
    if se is None:
        se = (None, None, None, None)
    elif len(se) != 4:
        raise ValueError(f"se must be (w_reduce, b_reduce, w_expand, b_expand), got {len(se)} items")
    args = (x, w_expand, b_expand, expand_activation, w_dw, b_dw, stride, padding4(padding), dilation,
            dw_activation, *se, se_activation, se_gate, post_se_activation, w_project, b_project,
            project_activation, bool(residual), backend or "")
    if plain_eager_call(x, w_expand, b_expand, w_dw, b_dw, *se, w_project, b_project):
        return _inverted_residual_op(*args)
    return torch.ops.mbkernels.inverted_residual(*args)
