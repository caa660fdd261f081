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

from . import _native, dispatch  # _native first: it loads mbkernels._C
from ._contract import (CONTRACTS, BlockArgs, DWConvArgs, IntOrPair, SEArgs, check_x, memory_format_of, op_schema, pair,
                        padding4, tensor_positions)

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


def resolve(op: str, args, backend: Optional[str]) -> tuple:
    """Check, normalise, select: (the normalised arguments, the backend's Choice), or (args, None) for an empty
    input (the contract's output is the answer). The one path behind eager, planned, traced and tuned calls."""
    contract = CONTRACTS[op]
    contract.check(args)
    if args.x.numel() == 0:
        return args, None
    args = contract.normalise(args)
    return args, dispatch.select(op, backend, args)


def _run(op: str, args, backend: str) -> Tensor:
    """The one implementation behind every public op."""
    args, choice = resolve(op, args, backend)
    return CONTRACTS[op].output(args) if choice is None else choice.run(args)


def prepare(op: str, *values) -> Callable[[Tensor], Tensor]:
    """The registered op's implementation for its arguments `values` (x first, the backend name last), with the
    checks, normalisation and backend choice made once: the callable runs the op on any x of values[0]'s shape,
    dtype, device and layout (the fused modules keep one per input signature for their plain eager calls)."""
    contract = CONTRACTS[op]
    args, choice = resolve(op, contract.bundle(*values[:-1]), values[-1])
    if choice is None:
        template = args._replace(x=None)
        return lambda x: contract.output(template._replace(x=x))
    if choice.prepare is not None and args.x is values[0]:  # x needs no normalising: the backend's own plan, if any
        planned = choice.prepare(args)
        if planned is not None:
            return planned
    run, layout, template = choice.run, memory_format_of(args.x), args._replace(x=None)  # the plan keeps no input
    return lambda x: run(template._replace(x=x.contiguous(memory_format=layout)))


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
    args, choice = resolve(op, args, backend)
    if choice is None or not choice.backend.traced_in_place(bool(V.aot_compilation)):
        return None
    return lambda: choice.run(args)


def _register(op: str) -> None:
    """Make torch.ops.mbkernels.<op> (arguments: the contract's bundle, then the backend's name) run _run on CPU
    and CUDA tensors, with the contract's output as its fake kernel, and what AOTDispatcher (torch.compile,
    AOTInductor) traces in its place (_seen_through).

    Where the native library defined the op (csrc/public_ops.cpp, in mbkernels._C; C++ programs run its C++
    kernels), this becomes its kernel for Python callers; otherwise the op is defined here, with the schema of
    the contract's bundle (_contract.op_schema)."""
    contract = CONTRACTS[op]
    qualname = f"mbkernels::{op}"

    def implementation(*values):
        return _run(op, contract.bundle(*values[:-1]), values[-1])

    if hasattr(torch.ops.mbkernels, op):
        if not _native_op_kernels:
            _native_op_kernels.append(torch.library.Library("mbkernels", "IMPL"))
        for key in ("CPU", "CUDA"):
            _native_op_kernels[0].impl(op, implementation, key)
    else:
        torch.library.custom_op(qualname, implementation, mutates_args=(), schema=op_schema(op))

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


for _op in CONTRACTS:
    _register(_op)


_TENSOR_POSITIONS = {op: tensor_positions(contract.fields) for op, contract in CONTRACTS.items()}


def _call(op: str, args, backend: Optional[str]) -> Tensor:
    """A public function's call of op on its bundle: a plain eager call (see plain_eager_call) runs the op's
    implementation directly, any other goes through the registered op."""
    if plain_eager_call(*(args[i] for i in _TENSOR_POSITIONS[op])):
        return _run(op, args, backend or "")
    return getattr(torch.ops.mbkernels, op)(*args, backend or "")


# ----------------------------------------------------------------------------- depthwise conv + BN + act
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
    args = DWConvArgs(x=x, weight=weight, bias=bias, stride=stride, padding=[0] * 4, dilation=dilation,
                      activation=activation)
    if padding is None:
        if not isinstance(weight, Tensor) or weight.dim() != 4:
            CONTRACTS["dwconv_bn_act"].check(args)  # it says what is wrong with weight
        padding = [dilation[0] * (weight.shape[2] // 2), dilation[1] * (weight.shape[3] // 2)]
    return _call("dwconv_bn_act", args._replace(padding=padding4(padding)), backend)


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
    args = SEArgs(x=x, w_reduce=w_reduce, b_reduce=b_reduce, w_expand=w_expand, b_expand=b_expand,
                  activation=activation, gate=gate)
    return _call("squeeze_excite", args, backend)


# ----------------------------------------------------------------------------- inverted-residual block
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
    w_se_reduce, b_se_reduce, w_se_expand, b_se_expand = se
    args = BlockArgs(x=x, w_expand=w_expand, b_expand=b_expand, expand_activation=expand_activation, w_dw=w_dw,
                     b_dw=b_dw, stride=stride, padding=padding4(padding), dilation=dilation,
                     dw_activation=dw_activation, w_se_reduce=w_se_reduce, b_se_reduce=b_se_reduce,
                     w_se_expand=w_se_expand, b_se_expand=b_se_expand, se_activation=se_activation, se_gate=se_gate,
                     post_se_activation=post_se_activation, w_project=w_project, b_project=b_project,
                     project_activation=project_activation, residual=bool(residual))
    return _call("inverted_residual", args, backend)
