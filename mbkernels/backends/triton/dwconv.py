"""The triton backend of dwconv_bn_act: act(depthwise_conv2d(x, weight, bias)) in one pass over memory.

Two kernels, one program per tile of [output pixels x channels], the pixels of all images on one axis:
`_dwconv_cl_kernel` (channels_last: 16-byte vectors along channels) and `_dwconv_nchw_kernel`; `plan` allocates
the output and picks kernel and tile, which the triton backend runs on the contract's checked, normalised bundle.
"""
import functools

import torch
import triton
import triton.language as tl

from ... import activations
from ..._contract import DWConvArgs, dwconv_bn_act_output, memory_format_of
from . import Launch, interpreting, run_launches
from .activation_math import apply_activation

# Past this many elements offsets go int64 (with a margin: masked-off taps compute addresses outside x).
INT64_ELEMENTS = 2**30


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _dwconv_cl_kernel(
    x_ptr, weight_ptr, bias_ptr, out_ptr,
    C_VECTORS, H, W, OUT_PIXELS, OUT_W, OUTPUTS_PER_CHANNEL,
    PAD_H, PAD_W, ACT_PARAM,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    ACTIVATION: tl.constexpr,
    MULTIPLIER: tl.constexpr,  # depth multiplier: output channel o reads input channel o // MULTIPLIER
    VEC: tl.constexpr,  # channels per vector: C = C_VECTORS * VEC
    INT64: tl.constexpr,  # offsets in int64 (big tensors)
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """channels_last: a [pixels x channels] tile, channels contiguous. The channel count arrives as a count of
    VEC-wide vectors so that the compiler sees C % VEC == 0 (Triton only knows divisibility by 16 of its own):
    every x, weight, bias and output access is then one 16-byte vector per thread, also for C = 72 or 120."""
    C = C_VECTORS * VEC
    C_IN = C // MULTIPLIER
    # One flat grid axis (limit 2**31 - 1): pixel blocks, then channel blocks.
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    pixel_blocks = tl.cdiv(OUTPUTS_PER_CHANNEL, BLOCK_P)
    channels = ((pid // pixel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    pixels = ((pid % pixel_blocks) * BLOCK_P + tl.arange(0, BLOCK_P))[:, None]
    channel_mask = channels < C
    pixel_mask = pixels < OUTPUTS_PER_CHANNEL
    n = pixels // OUT_PIXELS
    oh = (pixels % OUT_PIXELS) // OUT_W
    ow = pixels % OUT_W
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    x_image = x_ptr + (n * H * W * C_IN + channels // MULTIPLIER)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    # A row of taps unrolled: its loads are independent and predicated (no branch), so they overlap. Unrolling
    # the rows too puts every tap's weights and x vectors in registers at once (k3: 156, k5: 244 registers,
    # 1-2 blocks per SM), so rows loop.
    for kh in range(KH):
        ih = ih0 + kh * DIL_H
        row_ok = pixel_mask & (ih >= 0) & (ih < H)
        x_row = x_image + ih * W * C_IN
        for kw in tl.static_range(KW):
            iw = iw0 + kw * DIL_W
            ok = row_ok & (iw >= 0) & (iw < W) & channel_mask
            values = tl.load(x_row + iw * C_IN, mask=ok, other=0.0)
            # Tap-major weights (tap * C + c): one tap's weights for the tile's channels are contiguous.
            weights = tl.load(weight_ptr + (kh * KW + kw) * C + channels, mask=channel_mask, other=0.0)
            acc += values.to(tl.float32) * weights
    acc += tl.load(bias_ptr + channels, mask=channel_mask, other=0.0)
    acc = apply_activation(acc, ACTIVATION, ACT_PARAM)
    tl.store(out_ptr + (pixels * C + channels), acc.to(out_ptr.dtype.element_ty), mask=pixel_mask & channel_mask)


@triton.jit
def _dwconv_nchw_kernel(
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
    INT64: tl.constexpr,  # offsets in int64 (big tensors)
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """NCHW: a [channels x pixels] tile. Pixels of all images form one axis (N * OUT_H * OUT_W), so small planes
    still fill a tile. One flat grid axis (limit 2**31 - 1): pixel blocks, then channel blocks."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    pixel_blocks = tl.cdiv(OUTPUTS_PER_CHANNEL, BLOCK_P)
    channels = ((pid // pixel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C))[:, None]
    pixels = ((pid % pixel_blocks) * BLOCK_P + tl.arange(0, BLOCK_P))[None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    channel_mask = channels < C
    out_mask = channel_mask & (pixels < OUTPUTS_PER_CHANNEL)
    n = pixels // OUT_PIXELS
    oh = (pixels % OUT_PIXELS) // OUT_W
    ow = pixels % OUT_W
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    # What does not change from tap to tap is computed outside the tap loops.
    x_taps = x_ptr + (n * x_stride_n + (channels // MULTIPLIER) * x_stride_c)
    weight_taps = weight_ptr + channels
    for kh in tl.static_range(KH):
        ih = ih0 + kh * DIL_H
        row_ok = out_mask & (ih >= 0) & (ih < H)
        x_row = x_taps + ih * x_stride_h
        for kw in tl.static_range(KW):
            iw = iw0 + kw * DIL_W
            values = tl.load(x_row + iw * x_stride_w, mask=row_ok & (iw >= 0) & (iw < W), other=0.0)
            weights = tl.load(weight_taps + (kh * KW + kw) * C, mask=channel_mask, other=0.0)
            acc += values.to(tl.float32) * weights

    acc += tl.load(bias_ptr + channels, mask=channel_mask, other=0.0)
    acc = apply_activation(acc, ACTIVATION, ACT_PARAM)
    out_offsets = n * out_stride_n + channels * out_stride_c + oh * out_stride_h + ow * out_stride_w
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _channel_block(channels: int, vec: int, cap: int) -> int:
    """The widest power-of-two channel block (at most `cap`, at least `vec`) that pads C by at most 1/8: C=72
    takes 8-wide blocks rather than two 64-wide ones (44% idle)."""
    block = min(triton.next_power_of_2(channels), cap)
    while block > vec and triton.cdiv(channels, block) * block * 8 > channels * 9:
        block //= 2
    return block


def _cl_tile(channels: int, pixels: int, kernel_width: int, vec: int, multiprocessors: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps) in channels_last: each thread holds one VEC-channel vector of 2 pixels
    (2 outputs per weight vector it loads) or, for kernels wider than 3, of one; a small layer (batch 1) gets smaller tiles, down
    to one warp of one pixel per thread, until there are programs enough for every SM."""
    if interpreting():  # the interpreter's time grows with the number of programs: huge tiles
        block_c = min(triton.next_power_of_2(channels), 128)
        return block_c, min(triton.next_power_of_2(pixels), 65536 // block_c), 4
    block_c = _channel_block(channels, vec, 64)
    # A row of 5 taps for 2 pixels needs 137 registers (3 blocks per SM): wide kernels take one pixel.
    num_warps, pixels_per_thread = 4, (2 if kernel_width <= 3 else 1)

    def block_p():
        return min(max(1, num_warps * 32 * vec * pixels_per_thread // block_c), triton.next_power_of_2(pixels))

    def programs():
        return triton.cdiv(channels, block_c) * triton.cdiv(pixels, block_p())

    while True:
        # Tiles of fewer than 16 pixels get a weight layout that is converted through shared memory, and 4-byte
        # weight loads (read off the sm_90 SASS): narrower channel blocks keep 16 pixels.
        while block_p() < min(16, triton.next_power_of_2(pixels)) and block_c > vec:
            block_c //= 2
        if programs() >= multiprocessors or (num_warps == 1 and pixels_per_thread == 1):
            return block_c, block_p(), num_warps
        if pixels_per_thread > 1:
            pixels_per_thread //= 2
        else:
            num_warps //= 2


def _nchw_tile(channels: int, pixels: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps) in NCHW: pixels (contiguous) take what they can of the tile, channels the
    rest. 256-element tiles: [4 x 256] needed 168 registers at k5 (18% occupancy), [2 x 128] needs 64 (sm_90
    SASS); a small layer gets 2 warps, so that there are programs enough to fill the GPU."""
    if interpreting():
        tile, max_block_p, num_warps = 65536, 65536, 4
    else:
        tile, max_block_p, num_warps = 256, 128, (4 if channels * pixels >= 2**20 else 2)
    block_p = min(triton.next_power_of_2(pixels), max_block_p)
    block_c = min(triton.next_power_of_2(channels), tile // block_p)
    return block_c, block_p, num_warps


def plan(args: DWConvArgs, multiprocessors=None) -> tuple[torch.Tensor, list]:
    """The output (allocated) and the launches that fill it; `multiprocessors`: of the GPU planned for (None:
    x's device; the static report plans for one that is not there)."""
    x, weight = args.x, args.weight
    batch, _, height, width = x.shape
    channels = args.out_channels
    kh, kw = weight.shape[2], weight.shape[3]
    out = dwconv_bn_act_output(args)
    out_h, out_w = out.shape[2], out.shape[3]
    if out.numel() == 0:
        return out, []  # no program to launch (and no tile fits a zero-sized axis)
    outputs_per_channel = batch * out_h * out_w
    name, parameter = activations.parse_activation(args.activation)
    shared = dict(KH=kh, KW=kw, STRIDE_H=args.stride[0], STRIDE_W=args.stride[1],
                  DIL_H=args.dilation[0], DIL_W=args.dilation[1],
                  ACTIVATION=activations.ACTIVATIONS.index(name), MULTIPLIER=args.multiplier,
                  INT64=max(x.numel(), out.numel()) >= INT64_ELEMENTS)
    if memory_format_of(x) == torch.channels_last:
        # 16-byte vectors along channels where they line up (whole vectors, each input channel its own output).
        vec = 16 // x.element_size()
        vec = vec if channels % vec == 0 and args.multiplier == 1 else 1
        if multiprocessors is None:
            multiprocessors = 1 if interpreting() else _multiprocessors(x.device)
        block_c, block_p, num_warps = _cl_tile(channels, outputs_per_channel, kw, vec, multiprocessors)
        programs = triton.cdiv(channels, block_c) * triton.cdiv(outputs_per_channel, block_p)
        return out, [Launch(
            _dwconv_cl_kernel, (programs,),
            (x, weight, args.bias, out, channels // vec, height, width, out_h * out_w, out_w, outputs_per_channel,
             args.padding[0], args.padding[2], parameter),
            dict(shared, VEC=vec, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps))]
    block_c, block_p, num_warps = _nchw_tile(channels, outputs_per_channel)
    programs = triton.cdiv(channels, block_c) * triton.cdiv(outputs_per_channel, block_p)
    return out, [Launch(
        _dwconv_nchw_kernel, (programs,),
        (x, weight, args.bias, out, channels, height, width, out_w, out_h * out_w, outputs_per_channel,
         *x.stride(), *out.stride(), args.padding[0], args.padding[2], parameter),
        dict(shared, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps))]


def launch(args: DWConvArgs) -> torch.Tensor:
    out, launches = plan(args)
    run_launches(launches, args.x)
    return out
