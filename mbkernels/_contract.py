"""What every layer agrees on, op by op: the argument bundle, its checks, the output's shape and layout, the fake.

ops.py (the public functions and registered ops), dispatch, every backend and the fused modules import this module
and nothing above it. A backend's run function receives one checked, normalised bundle:
  x        contiguous in its own layout (NCHW or channels_last), float32/float16/bfloat16, non-empty;
  weights  float32 on x's device, in any strides for the depthwise and 1x1 weights: each backend reads them in
           its own layout (the GPU kernels tap-major / input-major, see `tap_major` and `input_major`; the reference
           contiguous), a no-op for the fused modules' weights, which are folded into the layout of their device;
           every other weight contiguous;
  padding  four ints [top, bottom, left, right]; activation an activation spec ("relu", "leaky_relu:0.2").

Each bundle's fields, in order and with their types, are the one list of its op's arguments: the registered op
takes them (then the name of the backend to run it), its schema follows from them (`op_schema`), and so do the
public function's call and the CUDA kernels' op; tests/test_signatures.py holds the C++ schemas to them.
"""
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import activations

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IntOrPair = Union[int, Sequence[int]]
# The schema type of each type a bundle's field has: what torch.library.infer_schema gives these Python types.
SCHEMA_TYPES = {Tensor: "Tensor", Optional[Tensor]: "Tensor?", list[int]: "SymInt[]", str: "str", bool: "bool"}


# ------------------------------------------------------------------------------------------- shared checks
def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last when x is laid out (or viewed) with channels innermost, else NCHW."""
    if x.dim() == 4 and not x.is_contiguous() and x.stride(1) == 1 and x.shape[1] > 1:
        return torch.channels_last
    return torch.contiguous_format


def pair(value: IntOrPair, name: str) -> list[int]:
    if isinstance(value, int):
        return [value, value]
    try:
        values = list(value)
    except TypeError:
        values = None
    if values is None or len(values) != 2 or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return values


def padding4(value: Union[int, Sequence[int]]) -> list[int]:
    """An int, a symmetric pair [h, w] or [top, bottom, left, right] -> [top, bottom, left, right]."""
    if isinstance(value, int):
        value = [value, value]
    try:
        values = list(value)
    except TypeError:
        values = None
    if values is None or len(values) not in (2, 4) or not all(isinstance(v, int) for v in values):
        raise ValueError(f"padding must be an int, a pair of ints or four ints [top, bottom, left, right], "
                         f"got {value!r}")
    if min(values) < 0:
        count = "two" if len(values) == 2 else "four"
        raise ValueError(f"padding must be {count} ints >= 0, got {values}")
    return [values[0], values[0], values[1], values[1]] if len(values) == 2 else values


def check_x(x) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")


def check_tensor(t, name: str, dims: int, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be a {dims}-D tensor, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; put them on one device")


def as_float32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def device_layout(weight: Tensor, kernel_layout) -> Tensor:
    """weight in the layout its device's backend reads without a copy: `kernel_layout` (tap_major, input_major)
    on a GPU, contiguous elsewhere (the reference backend: oneDNN would reorder any other layout on every call).
    The fused modules fold into it; a backend that reads another layout converts (a no-op when it matches)."""
    return kernel_layout(weight) if weight.is_cuda else weight.to(torch.float32).contiguous()


def tap_major(weight: Tensor) -> Tensor:
    """The depthwise weight [C, 1, kh, kw] as float32 with the channel innermost (element (c, 0, i, j) at
    (i * kw + j) * C + c): one tap's weights for neighbouring channels are one vector load in channels_last kernels.
    A no-op for a weight already laid out so; the fused modules fold into this layout once."""
    weight = weight.to(torch.float32)
    if weight.permute(2, 3, 1, 0).is_contiguous():
        return weight
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


# ------------------------------------------------------------------------------ depthwise conv + BN + act
class DWConvArgs(NamedTuple):
    """act(conv2d(x, weight, bias, stride, padding, dilation, groups=C)): weight [C * M, 1, kh, kw], M the depth
    multiplier (output channel o reads input channel o // M)."""
    x: Tensor
    weight: Tensor
    bias: Tensor
    stride: list[int]  # [h, w]
    padding: list[int]  # [top, bottom, left, right]
    dilation: list[int]  # [h, w]
    activation: str

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def multiplier(self) -> int:
        return self.weight.shape[0] // self.x.shape[1]

    @property
    def out_hw(self) -> tuple[int, int]:
        kh, kw = self.weight.shape[2], self.weight.shape[3]
        top, bottom, left, right = self.padding
        out_h = (self.x.shape[2] + top + bottom - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (self.x.shape[3] + left + right - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return out_h, out_w


def check_dwconv_bn_act(args: DWConvArgs) -> None:
    x, weight, bias = args.x, args.weight, args.bias
    check_x(x)
    channels = x.shape[1]
    check_tensor(weight, "weight", 4, x.device)
    out_channels = weight.shape[0]
    depthwise = weight.shape[1] == 1 and (out_channels == channels or (channels > 0 and out_channels % channels == 0))
    if not depthwise:
        raise ValueError(
            f"weight must be [C * M, 1, kh, kw] with C = {channels} (x's channels) and M >= 1 for a depthwise conv, "
            f"got {tuple(weight.shape)}; a conv that is not depthwise (groups != channels) cannot be fused"
        )
    check_tensor(bias, "bias", 1, x.device)
    if bias.shape[0] != out_channels:
        raise ValueError(f"bias must be [C * M] = [{out_channels}], got {tuple(bias.shape)}")
    for name, values, low in (("stride", args.stride, 1), ("dilation", args.dilation, 1)):
        if len(values) != 2 or min(values) < low:
            raise ValueError(f"{name} must be two ints >= {low}, got {list(values)}")
    if len(args.padding) != 4 or min(args.padding) < 0:
        raise ValueError(f"padding must be four ints >= 0 [top, bottom, left, right], got {list(args.padding)}")
    activations.parse_activation(args.activation)
    out_h, out_w = args.out_hw
    if out_h < 1 or out_w < 1:
        top, bottom, left, right = args.padding
        padded = [top, left] if (top, left) == (bottom, right) else list(args.padding)
        raise ValueError(
            f"the output would be empty ({out_h}x{out_w}): kernel {tuple(weight.shape[2:])} with dilation "
            f"{list(args.dilation)} does not fit x's {x.shape[2]}x{x.shape[3]} plane padded by {padded}"
        )


def dwconv_bn_act_output(args: DWConvArgs) -> Tensor:
    """The op's output, allocated (the fake kernel, and every backend's output)."""
    x = args.x
    out_h, out_w = args.out_hw
    return torch.empty((x.shape[0], args.out_channels, out_h, out_w), dtype=x.dtype, device=x.device,
                       memory_format=memory_format_of(x))


def normalise_dwconv_bn_act(args: DWConvArgs) -> DWConvArgs:
    """The bundle backends receive: x contiguous in its layout, weights float32 (the weight in its own strides)."""
    return args._replace(x=args.x.contiguous(memory_format=memory_format_of(args.x)),
                         weight=args.weight.to(torch.float32), bias=as_float32(args.bias))


# -------------------------------------------------------------------------------------- squeeze-excite
class SEArgs(NamedTuple):
    """x * gate(w_expand @ act(w_reduce @ mean_hw(x) + b_reduce) + b_expand), broadcast over H, W."""
    x: Tensor
    w_reduce: Tensor  # [R, C]
    b_reduce: Optional[Tensor]
    w_expand: Tensor  # [C, R]
    b_expand: Optional[Tensor]
    activation: str
    gate: str


def _check_matrix(w, name: str, rows: int, cols: int, device) -> None:
    if not isinstance(w, Tensor):
        raise ValueError(f"{name} must be a Tensor, got {type(w).__name__}")
    if w.dim() == 4 and w.shape[2:] == (1, 1):
        w = w.flatten(1)
    check_tensor(w, name, 2, device)
    if tuple(w.shape) != (rows, cols):
        raise ValueError(f"{name} must be [{rows}, {cols}] (or [{rows}, {cols}, 1, 1]), got {tuple(w.shape)}")


def check_squeeze_excite(args: SEArgs) -> None:
    x, w_reduce = args.x, args.w_reduce
    check_x(x)
    channels = x.shape[1]
    if not isinstance(w_reduce, Tensor) or w_reduce.dim() not in (2, 4):
        got = tuple(w_reduce.shape) if isinstance(w_reduce, Tensor) else type(w_reduce).__name__
        raise ValueError(f"w_reduce must be [R, C] (or [R, C, 1, 1]), got {got}")
    reduced = w_reduce.shape[0]
    _check_matrix(w_reduce, "w_reduce", reduced, channels, x.device)
    _check_matrix(args.w_expand, "w_expand", channels, reduced, x.device)
    for name, b, size in (("b_reduce", args.b_reduce, reduced), ("b_expand", args.b_expand, channels)):
        if b is not None:
            check_tensor(b, name, 1, x.device)
            if b.shape[0] != size:
                raise ValueError(f"{name} must be [{size}], got {tuple(b.shape)}")
    activations.parse_activation(args.activation)
    activations.gate_code(args.gate)


def squeeze_excite_output(args: SEArgs) -> Tensor:
    return torch.empty_like(args.x, memory_format=memory_format_of(args.x))


def normalise_squeeze_excite(args: SEArgs) -> SEArgs:
    return args._replace(
        x=args.x.contiguous(memory_format=memory_format_of(args.x)),
        w_reduce=as_float32(args.w_reduce.flatten(1)), b_reduce=as_float32(args.b_reduce),
        w_expand=as_float32(args.w_expand.flatten(1)), b_expand=as_float32(args.b_expand),
    )


def _conv_settings(args):
    """args with stride and dilation as lists, padding as [top, bottom, left, right] (from [h, w] too)."""
    return args._replace(stride=list(args.stride), padding=padding4(list(args.padding)), dilation=list(args.dilation))


def dwconv_bn_act_bundle(*values) -> DWConvArgs:
    """The bundle of the registered op's arguments (its backend's name aside)."""
    return _conv_settings(DWConvArgs(*values))


# ------------------------------------------------------------------------------ inverted-residual block
def input_major(weight: Tensor) -> Tensor:
    """A 1x1 conv's weight [rows, cols] (or [rows, cols, 1, 1]) as float32 with the row innermost (element (r, c)
    at c * rows + r): the kernels' tl.dot reads W.T tiles [cols, rows] contiguous along rows. A no-op for a
    weight already laid out so; the fused block module folds into this layout once."""
    weight = weight.to(torch.float32)
    if weight.dim() == 4:
        weight = weight.flatten(1)
    if weight.t().is_contiguous():
        return weight
    return weight.t().contiguous().t()


class BlockArgs(NamedTuple):
    """An inverted-residual block, every BN folded into its conv:
        h = expand_act(w_expand @ x + b_expand)            (absent when w_expand is None: h = x)
        d = dw_act(depthwise_conv2d(h, w_dw, b_dw, stride, padding, dilation))
        d = post_se_act(d * gate(se(mean_hw(d))))          (absent when w_se_reduce is None)
        y = project_act(w_project @ d + b_project) [+ x when residual]
    The SE's MLP is squeeze_excite's: w_se_expand @ se_act(w_se_reduce @ pooled + b_se_reduce) + b_se_expand."""
    x: Tensor  # [N, C, H, W]
    w_expand: Optional[Tensor]  # [E, C]
    b_expand: Optional[Tensor]  # [E]
    expand_activation: str
    w_dw: Tensor  # [E, 1, kh, kw]
    b_dw: Tensor  # [E]
    stride: list[int]  # [h, w]
    padding: list[int]  # [top, bottom, left, right]
    dilation: list[int]  # [h, w]
    dw_activation: str
    w_se_reduce: Optional[Tensor]  # [R, E]
    b_se_reduce: Optional[Tensor]  # [R]
    w_se_expand: Optional[Tensor]  # [E, R]
    b_se_expand: Optional[Tensor]  # [E]
    se_activation: str
    se_gate: str
    post_se_activation: str  # after the SE's scale (hand-written blocks apply the dw activation there)
    w_project: Tensor  # [O, E]
    b_project: Tensor  # [O]
    project_activation: str
    residual: bool

    @property
    def hidden_channels(self) -> int:
        return self.w_dw.shape[0]

    @property
    def out_channels(self) -> int:
        return self.w_project.shape[0]

    @property
    def has_se(self) -> bool:
        return self.w_se_reduce is not None

    def depthwise(self, h: Tensor) -> DWConvArgs:
        """The block's depthwise stage as a dwconv_bn_act bundle on the hidden activations h."""
        return DWConvArgs(x=h, weight=self.w_dw, bias=self.b_dw, stride=self.stride, padding=self.padding,
                          dilation=self.dilation, activation=self.dw_activation)

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.depthwise(self.x).out_hw  # h has x's plane


def _check_vector(b, name: str, size: int, device) -> None:
    check_tensor(b, name, 1, device)
    if b.shape[0] != size:
        raise ValueError(f"{name} must be [{size}], got {tuple(b.shape)}")


def check_inverted_residual(args: BlockArgs) -> None:
    x = args.x
    check_x(x)
    channels = x.shape[1]
    check_tensor(args.w_dw, "w_dw", 4, x.device)
    hidden = args.w_dw.shape[0]
    if args.w_dw.shape[1] != 1:
        raise ValueError(f"w_dw must be a depthwise weight [E, 1, kh, kw], got {tuple(args.w_dw.shape)}")
    if args.w_expand is None:
        if args.b_expand is not None:
            raise ValueError("b_expand is given without w_expand")
        if hidden != channels:
            raise ValueError(f"without an expand conv the depthwise conv runs on x's {channels} channels, but w_dw "
                             f"is {tuple(args.w_dw.shape)}")
    else:
        if not isinstance(args.w_expand, Tensor) or args.w_expand.dim() not in (2, 4):
            got = tuple(args.w_expand.shape) if isinstance(args.w_expand, Tensor) else type(args.w_expand).__name__
            raise ValueError(f"w_expand must be [E, C] (or [E, C, 1, 1]), got {got}")
        _check_matrix(args.w_expand, "w_expand", hidden, channels, x.device)
        if args.b_expand is None:
            raise ValueError("w_expand is given without b_expand (a folded conv has a bias)")
        _check_vector(args.b_expand, "b_expand", hidden, x.device)
    _check_vector(args.b_dw, "b_dw", hidden, x.device)
    if not isinstance(args.w_project, Tensor) or args.w_project.dim() not in (2, 4):
        got = tuple(args.w_project.shape) if isinstance(args.w_project, Tensor) else type(args.w_project).__name__
        raise ValueError(f"w_project must be [O, E] (or [O, E, 1, 1]), got {got}")
    out_channels = args.w_project.shape[0]
    _check_matrix(args.w_project, "w_project", out_channels, hidden, x.device)
    _check_vector(args.b_project, "b_project", out_channels, x.device)
    se_weights = (args.w_se_reduce, args.w_se_expand)
    if (se_weights[0] is None) != (se_weights[1] is None):
        raise ValueError("an SE needs both w_se_reduce and w_se_expand (or neither, for a block without SE)")
    if args.has_se:
        check_squeeze_excite(SEArgs(x=x.new_empty((1, hidden, 1, 1)), w_reduce=args.w_se_reduce,
                                    b_reduce=args.b_se_reduce, w_expand=args.w_se_expand, b_expand=args.b_se_expand,
                                    activation=args.se_activation, gate=args.se_gate))
    elif args.b_se_reduce is not None or args.b_se_expand is not None:
        raise ValueError("SE biases are given without SE weights")
    elif activations.parse_activation(args.post_se_activation)[0] != "identity":
        raise ValueError(f"post_se_activation {args.post_se_activation!r} is given for a block without SE; "
                         f"use dw_activation")
    for name in ("expand_activation", "post_se_activation", "project_activation"):
        activations.parse_activation(getattr(args, name))
    check_dwconv_bn_act(args.depthwise(x.new_empty((1, hidden, x.shape[2], x.shape[3]))))
    if args.residual and (out_channels != channels or args.out_hw != tuple(x.shape[2:])):
        raise ValueError(f"a residual add needs the output's shape to be x's: x has {channels} channels of "
                         f"{x.shape[2]}x{x.shape[3]}, the block gives {out_channels} of "
                         f"{args.out_hw[0]}x{args.out_hw[1]}")


def inverted_residual_output(args: BlockArgs) -> Tensor:
    x = args.x
    out_h, out_w = args.out_hw
    return torch.empty((x.shape[0], args.out_channels, out_h, out_w), dtype=x.dtype, device=x.device,
                       memory_format=memory_format_of(x))


def _matrix(weight: Optional[Tensor]) -> Optional[Tensor]:
    """A 1x1 conv's weight as a float32 matrix [rows, cols], in its own strides."""
    return None if weight is None else weight.to(torch.float32).flatten(1)


def normalise_inverted_residual(args: BlockArgs) -> BlockArgs:
    """x contiguous in its layout; the 1x1 and depthwise weights float32 in their own strides (see
    `kernel_layouts`), SE weights and every bias contiguous, all float32."""
    return args._replace(
        x=args.x.contiguous(memory_format=memory_format_of(args.x)),
        w_expand=_matrix(args.w_expand), b_expand=as_float32(args.b_expand),
        w_dw=args.w_dw.to(torch.float32), b_dw=as_float32(args.b_dw),
        w_se_reduce=None if args.w_se_reduce is None else as_float32(args.w_se_reduce.flatten(1)),
        b_se_reduce=as_float32(args.b_se_reduce),
        w_se_expand=None if args.w_se_expand is None else as_float32(args.w_se_expand.flatten(1)),
        b_se_expand=as_float32(args.b_se_expand),
        w_project=_matrix(args.w_project), b_project=as_float32(args.b_project),
    )


def kernel_layouts(args: BlockArgs) -> BlockArgs:
    """The GPU kernels' layouts of a normalised block bundle: 1x1 weights input-major, the depthwise one tap-major."""
    return args._replace(w_expand=None if args.w_expand is None else input_major(args.w_expand),
                         w_dw=tap_major(args.w_dw), w_project=input_major(args.w_project))


def inverted_residual_bundle(*values) -> BlockArgs:
    """The bundle of the registered op's arguments (its backend's name aside)."""
    args = _conv_settings(BlockArgs(*values))
    return args._replace(residual=bool(args.residual))


# ------------------------------------------------------------------------------------------ the contracts
class OpContract(NamedTuple):
    fields: type  # the bundle (a NamedTuple): its fields are the op's arguments, in order, with their types
    bundle: callable  # the registered op's arguments (its backend name aside) -> the bundle
    check: callable
    output: callable  # allocates the output: the fake kernel, and what an empty input returns
    normalise: callable


CONTRACTS = {
    "dwconv_bn_act": OpContract(DWConvArgs, dwconv_bn_act_bundle, check_dwconv_bn_act, dwconv_bn_act_output,
                                normalise_dwconv_bn_act),
    "squeeze_excite": OpContract(SEArgs, SEArgs, check_squeeze_excite, squeeze_excite_output, normalise_squeeze_excite),
    "inverted_residual": OpContract(BlockArgs, inverted_residual_bundle, check_inverted_residual,
                                    inverted_residual_output, normalise_inverted_residual),
}


def schema_arguments(fields: type) -> list[str]:
    """A bundle's fields as schema arguments: ["Tensor x", "Tensor? b_reduce", "SymInt[] stride", ...]."""
    return [f"{SCHEMA_TYPES[kind]} {name}" for name, kind in fields.__annotations__.items()]


def tensor_positions(fields: type) -> tuple[int, ...]:
    """The positions of a bundle's tensor fields (the optional ones too)."""
    kinds = fields.__annotations__.values()
    return tuple(i for i, kind in enumerate(kinds) if kind in (Tensor, Optional[Tensor]))


def op_schema(op: str) -> str:
    """The registered op's schema, its name aside: the bundle's fields, then the backend's name ("" picks one)."""
    return f"({', '.join(schema_arguments(CONTRACTS[op].fields) + ['str backend'])}) -> Tensor"
