"""The triton backend of dwconv_bn_act: act(depthwise_conv2d(x, weight, bias)) in one pass over memory.

Two layers: `_dwconv_bn_act_kernel` (one program per tile of [channels x output pixels], the pixels of all images
on one axis) and `launch` (allocates the output, picks the tile), which the triton backend runs on the contract's
checked, normalised argument bundle.
"""
import torch
import triton
import triton.language as tl

from ... import activations
from ..._contract import DWConvArgs, dwconv_bn_act_output, memory_format_of, tap_major
from .activation_math import apply_activation
from .launch import Launch, interpreting, run_launches

# Past this many elements offsets go int64 (with a margin: masked-off taps compute addresses outside x).
INT64_ELEMENTS = 2**30


@triton.jit
def _dwconv_bn_act_kernel(
    x_ptr, weight_ptr, bias_ptr, out_ptr,
    C, H, W, OUT_W, OUT_PIXELS, OUTPUTS_PER_CHANNEL,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    out_stride_n, out_stride_c, out_stride_h, out_stride_w,
    PAD_H, PAD_W, ACT_PARAM,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    ACTIVATION: tl.constexpr,
    MULTIPLIER: tl.constexpr,  # depth multiplier: output channel o reads input channel o // MULTIPLIER
    CHANNELS_LAST: tl.constexpr,  # the tile is [pixels, channels] (channels contiguous), else [channels, pixels]
    INT64: tl.constexpr,  # offsets in int64 (big tensors)
    VEC: tl.constexpr,  # C and the pixel strides are multiples of VEC (the launcher checked): 16-byte loads
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    if VEC > 1:
        # Identities when the launcher's check holds, they tell the compiler what it cannot see: a C of 72 or 120
        # is no multiple of 16, so without them every load along channels would be scalar.
        C = C // VEC * VEC
        x_stride_n = x_stride_n // VEC * VEC
        x_stride_h = x_stride_h // VEC * VEC
        x_stride_w = x_stride_w // VEC * VEC
        out_stride_n = out_stride_n // VEC * VEC
        out_stride_h = out_stride_h // VEC * VEC
        out_stride_w = out_stride_w // VEC * VEC
    # Pixels of all images form one axis (N * OUT_H * OUT_W), so small planes still fill a tile. One flat grid
    # axis (limit 2**31 - 1, where the others stop at 65535): pixel blocks, then channel blocks.
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    pixel_blocks = tl.cdiv(OUTPUTS_PER_CHANNEL, BLOCK_P)
    channels = (pid // pixel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    pixels = (pid % pixel_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    if CHANNELS_LAST:
        channels = channels[None, :]
        pixels = pixels[:, None]
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    else:
        channels = channels[:, None]
        pixels = pixels[None, :]
        acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    channel_mask = channels < C
    out_mask = channel_mask & (pixels < OUTPUTS_PER_CHANNEL)
    n = pixels // OUT_PIXELS
    oh = (pixels % OUT_PIXELS) // OUT_W
    ow = pixels % OUT_W
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    # What does not change from tap to tap is computed outside the tap loops: the interpreter's time grows with
    # the number of operations, and the GPU's with the integer work beside each load.
    x_taps = x_ptr + (n * x_stride_n + (channels // MULTIPLIER) * x_stride_c)
    # Tap-major weights (tap * C + c): one tap's weights for the tile's channels are contiguous.
    weight_taps = weight_ptr + channels
    for kh in range(KH):  # rows in a loop, taps along a row unrolled: a 5x5 kernel keeps 5 loads in flight, not 25
        ih = ih0 + kh * DIL_H
        row_ok = out_mask & (ih >= 0) & (ih < H)
        x_row = x_taps + ih * x_stride_h
        weight_row = weight_taps + kh * KW * C
        for kw in tl.static_range(KW):
            iw = iw0 + kw * DIL_W
            values = tl.load(x_row + iw * x_stride_w, mask=row_ok & (iw >= 0) & (iw < W), other=0.0)
            weights = tl.load(weight_row + kw * C, mask=channel_mask, other=0.0)
            acc += values.to(tl.float32) * weights

    acc += tl.load(bias_ptr + channels, mask=channel_mask, other=0.0)
    acc = apply_activation(acc, ACTIVATION, ACT_PARAM)
    out_offsets = n * out_stride_n + channels * out_stride_c + oh * out_stride_h + ow * out_stride_w
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _tile(channels: int, pixels: int, channels_last: bool) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps) for `pixels` output pixels (all images) per channel: the contiguous
    dimension takes what it can of the tile, the other the rest.

    The interpreter's time grows with the number of programs (not elements), so it gets huge tiles. On a GPU a
    thread holds a few vectors of 8 contiguous elements (channels_last: 16 per thread, each tap's weights serving
    2 pixels; NCHW: 4), few enough to stay in registers with the unrolled taps of a 5x5 kernel and leave >= 25%
    occupancy; a small layer gets small tiles, so that there are programs enough to fill the GPU.
    """
    if interpreting():
        tile, max_block_c, max_block_p, num_warps = 65536, 128, 65536, 4
    elif channels * pixels >= 2**20:
        tile, max_block_c, max_block_p, num_warps = (1024 if channels_last else 512), 64, 256, 4
    else:
        tile, max_block_c, max_block_p, num_warps = (1024, 64, 128, 4) if channels_last else (256, 64, 128, 2)
    if channels_last:
        block_c = min(triton.next_power_of_2(channels), max_block_c)
        block_p = min(triton.next_power_of_2(pixels), tile // block_c)
    else:
        block_p = min(triton.next_power_of_2(pixels), max_block_p)
        block_c = min(triton.next_power_of_2(channels), tile // block_p)
    return block_c, block_p, num_warps


def _vector_width(args: DWConvArgs, out: torch.Tensor) -> int:
    """Elements per 16-byte vector along channels when every pixel of x and out starts on a 16-byte boundary and
    each output channel reads its own input channel, else 1."""
    x = args.x
    vector = 16 // x.element_size()
    pixel_strides = (*x.stride()[:1], *x.stride()[2:], *out.stride()[:1], *out.stride()[2:])
    aligned = all(t.data_ptr() % 16 == 0 for t in (x, out, args.weight, args.bias))
    if args.multiplier == 1 and aligned and all(s % vector == 0 for s in (args.out_channels, *pixel_strides)):
        return vector
    return 1


def plan(args: DWConvArgs, multiprocessors=None) -> tuple[torch.Tensor, list]:
    """The output (allocated) and the launches that fill it. `multiprocessors` is accepted like squeeze_excite's
    plan (the static report passes it to every planner); this tile choice does not depend on it."""
    args = args._replace(weight=tap_major(args.weight))
    x, weight = args.x, args.weight
    batch, _, height, width = x.shape
    channels = args.out_channels
    kh, kw = weight.shape[2], weight.shape[3]
    out = dwconv_bn_act_output(args)
    out_h, out_w = out.shape[2], out.shape[3]
    if out.numel() == 0:
        return out, []  # no program to launch (and no tile fits a zero-sized axis)
    channels_last = memory_format_of(x) == torch.channels_last
    outputs_per_channel = batch * out_h * out_w
    block_c, block_p, num_warps = _tile(channels, outputs_per_channel, channels_last)
    programs = triton.cdiv(channels, block_c) * triton.cdiv(outputs_per_channel, block_p)
    name, parameter = activations.parse_activation(args.activation)
    vector = _vector_width(args, out) if channels_last else 1
    launch = Launch(
        _dwconv_bn_act_kernel, (programs,),
        (x, weight, args.bias, out,
         channels, height, width, out_w, out_h * out_w, outputs_per_channel,
         *x.stride(), *out.stride(),
         args.padding[0], args.padding[2], parameter),
        dict(KH=kh, KW=kw,
             STRIDE_H=args.stride[0], STRIDE_W=args.stride[1],
             DIL_H=args.dilation[0], DIL_W=args.dilation[1],
             ACTIVATION=activations.ACTIVATIONS.index(name),
             MULTIPLIER=args.multiplier,
             CHANNELS_LAST=channels_last,
             INT64=max(x.numel(), out.numel()) >= INT64_ELEMENTS,
             VEC=vector,
             BLOCK_C=block_c, BLOCK_P=block_p,
             num_warps=num_warps),
    )
    return out, [launch]


def launch(args: DWConvArgs) -> torch.Tensor:
    out, launches = plan(args)
    run_launches(launches, args.x)
    return out
