"""The triton backend of squeeze_excite: x * gate(w_expand @ act(w_reduce @ mean_hw(x) + b_reduce) + b_expand).

Three launches, the memory floor of a standalone op (x read twice, written once):
  `_pool_kernel`   per-channel float32 sums of x; a large plane is split over several programs, each writing
                   its own partial sums (no atomics, so the result is the same bits on every call);
  `_mlp_kernel`    once per sample (a program takes a block of samples): adds the partial sums in a fixed
                   order, then both linear layers, the activation and the gate: the float32 per-channel scale;
  `_scale_kernel`  x * scale, broadcast over the plane, in x's dtype and layout.
`launch` allocates and picks the tiles; the triton backend runs it on the contract's checked, normalised bundle.
"""
import functools

import torch
import triton
import triton.language as tl

from ... import activations
from ..._contract import SEArgs, memory_format_of, squeeze_excite_output
from .activation_math import apply_activation, apply_gate
from .launch import Launch, interpreting, run_launches

INT32_LIMIT = 2**31
# The hidden vector of one sample lives in one program's registers.
MAX_REDUCED_CHANNELS = 8192


@triton.jit
def _x_offsets(samples, channels, pixels, C, HW, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr):
    """Offsets of the [samples x channels x pixels] tile in x contiguous in its layout; INT64: in int64, for an x
    of 2**31 elements or more."""
    if INT64:
        samples = samples.to(tl.int64)
        channels = channels.to(tl.int64)
        pixels = pixels.to(tl.int64)
    samples = samples[:, None, None]
    channels = channels[None, :, None]
    pixels = pixels[None, None, :]
    if CHANNELS_LAST:
        return samples * HW * C + pixels * C + channels
    return samples * C * HW + channels * HW + pixels


@triton.jit
def _vector_hint(C, HW, CHANNELS_LAST: tl.constexpr, VEC: tl.constexpr):
    """(C, HW) with the contiguous one (C in channels_last, HW in NCHW) written as a multiple of VEC: an identity
    that tells the compiler what it cannot see (C = 72, 28 x 28 pixels: no multiple of 16), so it loads 16 bytes."""
    if VEC > 1:
        if CHANNELS_LAST:
            C = C // VEC * VEC
        else:
            HW = HW // VEC * VEC
    return C, HW


@triton.jit
def _program_tile(inner_blocks, N, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of the pool and scale kernels' one flat grid axis (the others stop at 65535): inner
    blocks (pixel splits or blocks) fastest, then channel blocks, then sample blocks. Returns the inner index, the
    tile's samples and channels, and their [BLOCK_N, BLOCK_C] mask."""
    pid = tl.program_id(0)
    channel_blocks = tl.cdiv(C, BLOCK_C)
    inner = pid % inner_blocks
    channel_block = (pid // inner_blocks) % channel_blocks
    sample_block = pid // (inner_blocks * channel_blocks)
    samples = sample_block * BLOCK_N + tl.arange(0, BLOCK_N)
    channels = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    return inner, samples, channels, (samples < N)[:, None] & (channels < C)[None, :]


@triton.jit
def _pool_kernel(
    x_ptr, partial_ptr,
    N, C, HW, PIXELS_PER_SPLIT, SPLITS,
    CHANNELS_LAST: tl.constexpr,
    INT64: tl.constexpr,
    VEC: tl.constexpr,  # x's contiguous axis is a multiple of VEC (the launcher checked): 16-byte loads along it
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    C, HW = _vector_hint(C, HW, CHANNELS_LAST, VEC)
    split, samples, channels, rows_mask = _program_tile(SPLITS, N, C, BLOCK_N, BLOCK_C)
    first_pixel = split * PIXELS_PER_SPLIT
    acc = tl.zeros((BLOCK_N, BLOCK_C, BLOCK_P), dtype=tl.float32)
    # PIXELS_PER_SPLIT is a multiple of BLOCK_P, so the splits' steps never overlap.
    for step in range(0, PIXELS_PER_SPLIT, BLOCK_P):
        pixels = first_pixel + step + tl.arange(0, BLOCK_P)
        mask = rows_mask[:, :, None] & (pixels < HW)[None, None, :]
        offsets = _x_offsets(samples, channels, pixels, C, HW, CHANNELS_LAST, INT64)
        values = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        acc += values.to(tl.float32)
    partial_offsets = (samples[:, None] * SPLITS + split) * C + channels[None, :]
    tl.store(partial_ptr + partial_offsets, tl.sum(acc, axis=2), mask=rows_mask)


@triton.jit
def _mlp_kernel(
    partial_ptr, w_reduce_ptr, b_reduce_ptr, w_expand_ptr, b_expand_ptr, scale_ptr,
    N, C, R, HW, SPLITS, ACT_PARAM,
    ACTIVATION: tl.constexpr, GATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Each program runs the MLP once for each of its BLOCK_N samples, reading each weight tile once for all of
    # them. A broadcast-multiply and tl.sum rather than tl.dot: R and the sample count are often under 16.
    samples = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    sample_mask = samples < N
    rows = tl.arange(0, BLOCK_R)
    row_mask = rows < R

    # hidden = act(mean @ w_reduce.T + b_reduce): [BLOCK_N x BLOCK_R], w_reduce [R, C] in [BLOCK_R x BLOCK_C] tiles.
    hidden = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for first_channel in range(0, C, BLOCK_C):
        channels = first_channel + tl.arange(0, BLOCK_C)
        channel_mask = channels < C
        pooled_mask = sample_mask[:, None] & channel_mask[None, :]
        pooled = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for split in range(SPLITS):  # a fixed order: the same bits on every call
            partial_offsets = (samples[:, None] * SPLITS + split) * C + channels[None, :]
            pooled += tl.load(partial_ptr + partial_offsets, mask=pooled_mask, other=0.0)
        pooled = pooled / HW
        w_mask = row_mask[:, None] & channel_mask[None, :]
        w = tl.load(w_reduce_ptr + rows[:, None] * C + channels[None, :], mask=w_mask, other=0.0)
        hidden += tl.sum(w[None, :, :] * pooled[:, None, :], axis=2)
    if b_reduce_ptr is not None:
        hidden += tl.load(b_reduce_ptr + rows, mask=row_mask, other=0.0)[None, :]
    hidden = tl.where(row_mask[None, :], apply_activation(hidden, ACTIVATION, ACT_PARAM), 0.0)

    # scale = gate(hidden @ w_expand.T + b_expand), w_expand [C, R] in [BLOCK_C x BLOCK_R] tiles, reduced along R
    # as read. (Read transposed, as [BLOCK_R x BLOCK_C], each tile went through shared memory into the layout of
    # the reduction; triton 3.6 then spilled at C=240, R=10.)
    for first_channel in range(0, C, BLOCK_C):
        channels = first_channel + tl.arange(0, BLOCK_C)
        channel_mask = channels < C
        w_mask = channel_mask[:, None] & row_mask[None, :]
        w = tl.load(w_expand_ptr + channels[:, None] * R + rows[None, :], mask=w_mask, other=0.0)
        logits = tl.sum(w[None, :, :] * hidden[:, None, :], axis=2)
        if b_expand_ptr is not None:
            logits += tl.load(b_expand_ptr + channels, mask=channel_mask, other=0.0)[None, :]
        scale_mask = sample_mask[:, None] & channel_mask[None, :]
        tl.store(scale_ptr + samples[:, None] * C + channels[None, :], apply_gate(logits, GATE), mask=scale_mask)


@triton.jit
def _scale_kernel(
    x_ptr, scale_ptr, out_ptr,
    N, C, HW,
    CHANNELS_LAST: tl.constexpr,
    INT64: tl.constexpr,
    VEC: tl.constexpr,  # x's contiguous axis is a multiple of VEC (the launcher checked): 16-byte loads along it
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    C, HW = _vector_hint(C, HW, CHANNELS_LAST, VEC)
    pixel_block, samples, channels, rows_mask = _program_tile(tl.cdiv(HW, BLOCK_P), N, C, BLOCK_N, BLOCK_C)
    pixels = pixel_block * BLOCK_P + tl.arange(0, BLOCK_P)
    scale = tl.load(scale_ptr + samples[:, None] * C + channels[None, :], mask=rows_mask, other=0.0)
    mask = rows_mask[:, :, None] & (pixels < HW)[None, None, :]
    offsets = _x_offsets(samples, channels, pixels, C, HW, CHANNELS_LAST, INT64)
    values = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    out = values.to(tl.float32) * scale[:, :, None]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ launcher
@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _target_pool_programs(device: torch.device, multiprocessors) -> int:
    """Enough pooling programs to fill the GPU (`multiprocessors` SMs, default: the device's). The interpreter's
    time grows with the number of programs, so it gets few; large planes of a single sample still split there,
    which keeps the split path tested."""
    if interpreting():
        return 4
    return 4 * (multiprocessors or _multiprocessors(device))


def _tile(batch: int, channels: int, pixels: int, channels_last: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, BLOCK_P) for pooling and scaling.

    The contiguous dimension gets up to its cap, the other the rest of the tile: 112x112 planes with C=16 get
    long pixel rows (NCHW) or whole 16-channel pixels (channels_last), 7x7 planes with C=960 get 64-pixel rows of
    many channels. Tiles of small planes span several samples. The interpreter gets bigger tiles (fewer programs).
    """
    tile = 1 << 17 if interpreting() else 4096
    if channels_last:
        block_c = min(triton.next_power_of_2(channels), 512 if interpreting() else 256)
        block_p = min(triton.next_power_of_2(pixels), tile // block_c)
    else:
        block_p = min(triton.next_power_of_2(pixels), 4096 if interpreting() else 1024)
        block_c = min(triton.next_power_of_2(channels), tile // block_p)
    block_n = min(triton.next_power_of_2(batch), max(1, tile // (block_c * block_p)))
    return block_n, block_c, block_p


def _mlp_tile(batch: int, channels: int, reduced: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_R, BLOCK_C): all of R at once, C in chunks (C=1280 loops rather than holding [R, C]); on a
    GPU 16 products per thread, which keeps >= 25% occupancy."""
    tile = 1 << 17 if interpreting() else 2048
    block_r = triton.next_power_of_2(reduced)
    block_c = min(triton.next_power_of_2(channels), max(1, tile // block_r))
    block_n = min(triton.next_power_of_2(batch), max(1, tile // (block_r * block_c)))
    return block_n, block_r, block_c


def _pool_splits(sample_blocks: int, channel_blocks: int, pixels: int, block_p: int, device,
                 multiprocessors) -> tuple[int, int]:
    """(pixels per split, splits): each plane's pixels split into runs of whole BLOCK_P steps, so that there are
    enough pooling programs when there are few samples and channel blocks."""
    pixel_blocks = triton.cdiv(pixels, block_p)
    wanted_splits = triton.cdiv(_target_pool_programs(device, multiprocessors), sample_blocks * channel_blocks)
    pixels_per_split = triton.cdiv(pixel_blocks, min(pixel_blocks, wanted_splits)) * block_p
    return pixels_per_split, triton.cdiv(pixels, pixels_per_split)


def mlp_launch(partial_sums, scale, w_reduce, b_reduce, w_expand, b_expand, pixels: int, activation: str,
               gate: str) -> Launch:
    """The MLP launch that turns float32 partial pool sums [N, splits, C] of planes of `pixels` pixels into the
    float32 per-channel scale [N, C] (this op's second launch; inverted_residual's too, over its tiles' sums)."""
    batch, splits, channels = (int(size) for size in partial_sums.shape)
    reduced = int(w_reduce.shape[0])
    block_n, block_r, block_c = _mlp_tile(batch, channels, reduced)
    name, parameter = activations.parse_activation(activation)
    return Launch(_mlp_kernel, (triton.cdiv(batch, block_n),),
                  (partial_sums, w_reduce, b_reduce, w_expand, b_expand, scale,
                   batch, channels, reduced, pixels, splits, parameter),
                  dict(ACTIVATION=activations.ACTIVATIONS.index(name), GATE=activations.gate_code(gate),
                       BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_C=block_c))


def plan(args: SEArgs, multiprocessors=None) -> tuple[torch.Tensor, list]:
    """The output (allocated) and the launches that fill it: pool, MLP, scale. `multiprocessors`: the SM count to
    fill (default: x's device's; the static report plans for an H200 on a machine without one)."""
    x, w_reduce, b_reduce, w_expand, b_expand = args.x, args.w_reduce, args.b_reduce, args.w_expand, args.b_expand
    # Plain ints: the tiles are picked per shape (when traced with dynamic shapes, this specialises them).
    batch, channels, height, width = (int(size) for size in x.shape)
    pixels = height * width
    channels_last = memory_format_of(x) == torch.channels_last
    int64 = x.numel() >= INT32_LIMIT
    out = squeeze_excite_output(args)
    block_n, block_c, block_p = _tile(batch, channels, pixels, channels_last)
    sample_blocks = triton.cdiv(batch, block_n)
    channel_blocks = triton.cdiv(channels, block_c)
    pixel_blocks = triton.cdiv(pixels, block_p)

    pixels_per_split, splits = _pool_splits(sample_blocks, channel_blocks, pixels, block_p, x.device,
                                            multiprocessors)
    partial_sums = torch.empty((batch, splits, channels), dtype=torch.float32, device=x.device)
    scale = torch.empty((batch, channels), dtype=torch.float32, device=x.device)
    vector = 16 // x.element_size()
    aligned = (x.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0
               and (channels if channels_last else pixels) % vector == 0)
    tiles = dict(CHANNELS_LAST=channels_last, INT64=int64, VEC=vector if aligned else 1,
                 BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_P=block_p)
    return out, [
        Launch(_pool_kernel, (sample_blocks * channel_blocks * splits,),
               (x, partial_sums, batch, channels, pixels, pixels_per_split, splits), tiles),
        mlp_launch(partial_sums, scale, w_reduce, b_reduce, w_expand, b_expand, pixels, args.activation, args.gate),
        Launch(_scale_kernel, (sample_blocks * channel_blocks * pixel_blocks,), (x, scale, out, batch, channels, pixels),
               tiles),
    ]


def launch(args: SEArgs) -> torch.Tensor:
    out, launches = plan(args)
    run_launches(launches, args.x)
    return out


def limit(args: SEArgs):
    if args.w_reduce.shape[0] > MAX_REDUCED_CHANNELS:
        return f"R = {args.w_reduce.shape[0]} reduced channels; the Triton MLP holds at most {MAX_REDUCED_CHANNELS}"
    return None
