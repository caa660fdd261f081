"""The triton backend of inverted_residual: a whole block with its expanded activations kept on chip.

A program owns one spatial tile of one image's output (TILE_H x TILE_W pixels, all output channels) and walks
the hidden channels E in chunks of BLOCK_E. For each chunk it computes the expand 1x1 conv (tl.dot, fp32
accumulation) over the tile's input halo -- the halo rows and columns that neighbouring tiles also need are
recomputed, never stored --, applies BN-folded bias and activation, zeroes the padding, runs the depthwise conv
from that on-chip tile (tl.gather of each tap's shifted pixels), and feeds the result straight into the project
1x1 conv's tl.dot. Launches:
  no SE    `_block_kernel` alone: x read once (plus halo), y written once;
  with SE  `_block_kernel` in its first-stage form writes the depthwise output d once and per-tile partial pool
           sums; squeeze_excite's MLP kernel (`mlp_launch`) turns the sums into the per-channel scale; `_project_kernel`
           reads d once, scales it, and runs the project conv, BN, activation and residual add.
fp16 / bf16 dots run on tensor cores; float32 dots in IEEE float32 (TF32 would miss the float32 tolerance).
Dot shapes are at least 16 along every axis (channel blocks padded with masks), as the GPU compiler requires.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ... import activations
from ..._contract import BlockArgs, inverted_residual_output, kernel_layouts
from .activation_math import apply_activation
from .launch import Launch, interpreting, run_launches
from .squeeze_excite import MAX_REDUCED_CHANNELS, mlp_launch

MIN_DOT = 16  # the GPU compiler's smallest tl.dot extent
# What the kernel declines: the project accumulator [BLOCK_P, BLOCK_O] and the halo tile [HALO_P, BLOCK_E]
# live in registers / shared memory, so O and the halo are bounded.
MAX_OUT_CHANNELS = 512
MAX_HALO_PIXELS = {False: 1024, True: 8192}  # by interpreting(): the interpreter's tiles are whole planes


@triton.jit
def _hidden_chunk(
    x_base, w_expand_ptr, b_expand_ptr, w_dw_ptr, b_dw_ptr,
    C, E, H, W, e0,
    x_stride_c, x_stride_h, x_stride_w,
    ih0, iw0, local_h, local_w,
    EXPAND_PARAM, DW_PARAM,
    HAS_EXPAND: tl.constexpr, EXPAND_ACTIVATION: tl.constexpr, DW_ACTIVATION: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, HALO_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dw_act(depthwise(h) + b_dw) for hidden channels e0 .. e0 + BLOCK_E of the tile: [BLOCK_P, BLOCK_E] fp32.

    ih0 / iw0: the input position of the halo's first row / column (padding included); local_h / local_w: each
    output pixel's position in the tile [BLOCK_P]."""
    hidden = e0 + tl.arange(0, BLOCK_E)
    hidden_mask = hidden < E
    acc = tl.zeros((BLOCK_P, BLOCK_E), dtype=tl.float32)
    if HAS_EXPAND:
        # The expand conv over the halo, once: [HALO_P, C] @ [C, BLOCK_E].
        halo = tl.arange(0, HALO_P)
        ih = ih0 + halo // HALO_W
        iw = iw0 + halo % HALO_W
        inside = (halo < HALO_H * HALO_W) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pixel_offsets = ih * x_stride_h + iw * x_stride_w
        expanded = tl.zeros((HALO_P, BLOCK_E), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            channels = c0 + tl.arange(0, BLOCK_C)
            channel_mask = channels < C
            x_tile = tl.load(x_base + pixel_offsets[:, None] + channels[None, :] * x_stride_c,
                             mask=inside[:, None] & channel_mask[None, :], other=0.0)
            # input-major weight: element (e, c) at c * E + e, so W.T tiles are contiguous along e.
            w_tile = tl.load(w_expand_ptr + channels[:, None] * E + hidden[None, :],
                             mask=channel_mask[:, None] & hidden_mask[None, :], other=0.0)
            expanded = tl.dot(x_tile.to(DOT_DTYPE), w_tile.to(DOT_DTYPE), expanded, input_precision=INPUT_PRECISION)
        expanded += tl.load(b_expand_ptr + hidden, mask=hidden_mask, other=0.0)[None, :]
        expanded = apply_activation(expanded, EXPAND_ACTIVATION, EXPAND_PARAM)
        expanded = tl.where(inside[:, None], expanded, 0.0)  # the depthwise conv pads h, not x, with zeros
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                source = (local_h * STRIDE_H + kh * DIL_H) * HALO_W + local_w * STRIDE_W + kw * DIL_W
                taps = tl.gather(expanded, tl.broadcast_to(source[:, None], (BLOCK_P, BLOCK_E)), 0)
                weights = tl.load(w_dw_ptr + (kh * KW + kw) * E + hidden, mask=hidden_mask, other=0.0)
                acc += taps * weights[None, :]
    else:
        # No expand conv: h is x, read straight at each tap (as dwconv_bn_act does).
        for kh in tl.static_range(KH):
            ih = ih0 + local_h * STRIDE_H + kh * DIL_H
            row_ok = (ih >= 0) & (ih < H)
            for kw in tl.static_range(KW):
                iw = iw0 + local_w * STRIDE_W + kw * DIL_W
                ok = row_ok & (iw >= 0) & (iw < W)
                values = tl.load(x_base + (ih * x_stride_h + iw * x_stride_w)[:, None] + hidden[None, :] * x_stride_c,
                                 mask=ok[:, None] & hidden_mask[None, :], other=0.0)
                weights = tl.load(w_dw_ptr + (kh * KW + kw) * E + hidden, mask=hidden_mask, other=0.0)
                acc += values.to(tl.float32) * weights[None, :]
    acc += tl.load(b_dw_ptr + hidden, mask=hidden_mask, other=0.0)[None, :]
    return apply_activation(acc, DW_ACTIVATION, DW_PARAM)


@triton.jit
def _project_store(
    acc, b_project_ptr, x_base, out_base, O, oh, ow, pixel_mask,
    x_stride_c, x_stride_h, x_stride_w, out_stride_c, out_stride_h, out_stride_w,
    PROJECT_PARAM,
    PROJECT_ACTIVATION: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """y = project_act(acc + b_project) [+ x], stored for the tile's pixels."""
    outs = tl.arange(0, BLOCK_O)
    out_mask = outs < O
    acc += tl.load(b_project_ptr + outs, mask=out_mask, other=0.0)[None, :]
    acc = apply_activation(acc, PROJECT_ACTIVATION, PROJECT_PARAM)
    mask = pixel_mask[:, None] & out_mask[None, :]
    if RESIDUAL:  # stride 1 and O == C: output pixel (oh, ow) adds x's pixel (oh, ow)
        shortcut = tl.load(x_base + (oh * x_stride_h + ow * x_stride_w)[:, None] + outs[None, :] * x_stride_c,
                           mask=mask, other=0.0)
        acc += shortcut.to(tl.float32)
    offsets = (oh * out_stride_h + ow * out_stride_w)[:, None] + outs[None, :] * out_stride_c
    tl.store(out_base + offsets, acc.to(out_base.dtype.element_ty), mask=mask)


@triton.jit
def _block_kernel(
    x_ptr, w_expand_ptr, b_expand_ptr, w_dw_ptr, b_dw_ptr, w_project_ptr, b_project_ptr,
    out_ptr, hidden_out_ptr, partial_ptr,
    C, E, O, H, W, OUT_H, OUT_W, TILES_W, TILES,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    out_stride_n, out_stride_c, out_stride_h, out_stride_w,
    PAD_T, PAD_L, EXPAND_PARAM, DW_PARAM, PROJECT_PARAM,
    HAS_EXPAND: tl.constexpr, EXPAND_ACTIVATION: tl.constexpr, DW_ACTIVATION: tl.constexpr,
    PROJECT_ACTIVATION: tl.constexpr, RESIDUAL: tl.constexpr,
    FIRST_STAGE: tl.constexpr,  # with SE: write d ([N, OUT_H, OUT_W, E]) and partial pool sums, no project
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    HALO_H: tl.constexpr, HALO_W: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HALO_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_O: tl.constexpr,
):
    # One program per (image, spatial tile); the image's base offset in int64 (a batch may pass 2**31 elements).
    pid = tl.program_id(0)
    n = (pid // TILES).to(tl.int64)
    tile = pid % TILES
    oh0 = (tile // TILES_W) * TILE_H
    ow0 = (tile % TILES_W) * TILE_W
    BLOCK_P: tl.constexpr = TILE_H * TILE_W
    pixels = tl.arange(0, BLOCK_P)
    local_h = pixels // TILE_W
    local_w = pixels % TILE_W
    oh = oh0 + local_h
    ow = ow0 + local_w
    pixel_mask = (oh < OUT_H) & (ow < OUT_W)
    ih0 = oh0 * STRIDE_H - PAD_T
    iw0 = ow0 * STRIDE_W - PAD_L
    x_base = x_ptr + n * x_stride_n
    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        d = _hidden_chunk(x_base, w_expand_ptr, b_expand_ptr, w_dw_ptr, b_dw_ptr, C, E, H, W, e0,
                          x_stride_c, x_stride_h, x_stride_w, ih0, iw0, local_h, local_w, EXPAND_PARAM, DW_PARAM,
                          HAS_EXPAND, EXPAND_ACTIVATION, DW_ACTIVATION, KH, KW, STRIDE_H, STRIDE_W, DIL_H, DIL_W,
                          HALO_H, HALO_W, DOT_DTYPE, INPUT_PRECISION, BLOCK_P, HALO_P, BLOCK_C, BLOCK_E)
        hidden = e0 + tl.arange(0, BLOCK_E)
        hidden_mask = hidden < E
        if FIRST_STAGE:
            d = tl.where(pixel_mask[:, None], d, 0.0)
            tl.store(partial_ptr + (n * TILES + tile) * E + hidden, tl.sum(d, axis=0), mask=hidden_mask)
            d_offsets = (n * OUT_H * OUT_W + oh * OUT_W + ow)[:, None] * E + hidden[None, :]
            tl.store(hidden_out_ptr + d_offsets, d.to(hidden_out_ptr.dtype.element_ty),
                     mask=pixel_mask[:, None] & hidden_mask[None, :])
        else:
            outs = tl.arange(0, BLOCK_O)
            w_tile = tl.load(w_project_ptr + hidden[:, None] * O + outs[None, :],
                             mask=hidden_mask[:, None] & (outs < O)[None, :], other=0.0)
            acc = tl.dot(d.to(DOT_DTYPE), w_tile.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    if not FIRST_STAGE:
        _project_store(acc, b_project_ptr, x_base, out_ptr + n * out_stride_n, O, oh, ow, pixel_mask,
                       x_stride_c, x_stride_h, x_stride_w, out_stride_c, out_stride_h, out_stride_w,
                       PROJECT_PARAM, PROJECT_ACTIVATION, RESIDUAL, BLOCK_O)


@triton.jit
def _project_kernel(
    hidden_ptr, scale_ptr, w_project_ptr, b_project_ptr, x_ptr, out_ptr,
    E, O, OUT_W, OUT_PIXELS, PIXEL_BLOCKS,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    out_stride_n, out_stride_c, out_stride_h, out_stride_w,
    POST_SE_PARAM, PROJECT_PARAM,
    POST_SE_ACTIVATION: tl.constexpr, PROJECT_ACTIVATION: tl.constexpr, RESIDUAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """The SE's second stage: y = project(post_se_act(d * scale)) [+ x], d read once."""
    pid = tl.program_id(0)
    n = (pid // PIXEL_BLOCKS).to(tl.int64)
    pixels = (pid % PIXEL_BLOCKS) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_mask = pixels < OUT_PIXELS
    outs = tl.arange(0, BLOCK_O)
    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        hidden = e0 + tl.arange(0, BLOCK_E)
        hidden_mask = hidden < E
        d = tl.load(hidden_ptr + (n * OUT_PIXELS + pixels)[:, None] * E + hidden[None, :],
                    mask=pixel_mask[:, None] & hidden_mask[None, :], other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + n * E + hidden, mask=hidden_mask, other=0.0)
        d = apply_activation(d * scale[None, :], POST_SE_ACTIVATION, POST_SE_PARAM)
        w_tile = tl.load(w_project_ptr + hidden[:, None] * O + outs[None, :],
                         mask=hidden_mask[:, None] & (outs < O)[None, :], other=0.0)
        acc = tl.dot(d.to(DOT_DTYPE), w_tile.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    _project_store(acc, b_project_ptr, x_ptr + n * x_stride_n, out_ptr + n * out_stride_n, O,
                   pixels // OUT_W, pixels % OUT_W, pixel_mask,
                   x_stride_c, x_stride_h, x_stride_w, out_stride_c, out_stride_h, out_stride_w,
                   PROJECT_PARAM, PROJECT_ACTIVATION, RESIDUAL, BLOCK_O)


# ------------------------------------------------------------------------------------------------ launcher
def _dot(x_dtype: torch.dtype):
    """(DOT_DTYPE, INPUT_PRECISION): x's own dtype on tensor cores; float32 in IEEE float32. Under Triton's CPU
    interpreter (TRITON_INTERPRET=1) a bf16 tl.dot gives wrong results (seen with triton 3.8's interpreter), so
    bf16 runs float32 dots there."""
    if x_dtype == torch.float16:
        return tl.float16, "ieee"
    if x_dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16, "ieee"
    return tl.float32, "ieee"


def _block(size: int, cap: int) -> int:
    return max(MIN_DOT, min(triton.next_power_of_2(size), cap))


def _halo(tile: int, stride: int, kernel: int, dilation: int) -> int:
    return (tile - 1) * stride + (kernel - 1) * dilation + 1


def tiles(args: BlockArgs, interpreter: Optional[bool] = None) -> dict:
    """The tile of a block: TILE_H x TILE_W output pixels (the interpreter, whose time grows with the number of
    programs, takes whole planes), the halo they read, and the channel blocks; plus num_warps.
    interpreter: the interpreter's tiles or the GPU's (None: those of this process)."""
    interpreter = interpreting() if interpreter is None else interpreter
    out_h, out_w = args.out_hw
    kh, kw = args.w_dw.shape[2:]
    # On a GPU 4x8 output pixels, 4x4 at stride 2 (whose halo is four times the tile's input), so that the halo
    # tile stays 128 pixels or less for 5x5 kernels. (8x16 tiles, which would halve the expand conv's recompute
    # for 5x5 kernels, spill on sm_90 even in the SE first stage, at 8 or 16 warps.)
    strided = max(args.stride) > 1
    pixels = 1024 if interpreter else (16 if strided else 32)
    tile_w = min(triton.next_power_of_2(out_w), 32 if interpreter else (4 if strided else 8))
    tile_h = max(1, min(triton.next_power_of_2(out_h), pixels // tile_w))
    tile_w = max(tile_w, MIN_DOT // tile_h)  # at least 16 pixels: the smallest dot
    halo_h = _halo(tile_h, args.stride[0], kh, args.dilation[0])
    halo_w = _halo(tile_w, args.stride[1], kw, args.dilation[1])
    # On sm_90, 16 hidden channels a step and 8 warps keep the halo tile, its gathers and the project
    # accumulator within 255 registers without spills for every MobileNetV3-Large block (benchmarks/blocks_static.py;
    # 32 channels, 4 warps, or at stride 2 4x8 tiles or input-channel steps over 16 spill).
    return dict(TILE_H=tile_h, TILE_W=tile_w, HALO_H=halo_h, HALO_W=halo_w,
                HALO_P=triton.next_power_of_2(halo_h * halo_w),
                BLOCK_C=_block(args.x.shape[1], 256 if interpreter else (MIN_DOT if strided else 64)),
                BLOCK_E=_block(args.hidden_channels, 256 if interpreter else MIN_DOT),
                BLOCK_O=_block(args.out_channels, MAX_OUT_CHANNELS), num_warps=8)


def _code_and_parameter(spec: str) -> tuple[int, float]:
    name, parameter = activations.parse_activation(spec)
    return activations.ACTIVATIONS.index(name), parameter


def plan(args: BlockArgs) -> tuple[torch.Tensor, list]:
    """The output (allocated) and the launches that fill it: one block kernel, or with SE its first stage, the SE
    MLP and the project kernel."""
    args = kernel_layouts(args)
    x = args.x
    batch, channels, height, width = (int(size) for size in x.shape)
    hidden, out_channels = args.hidden_channels, args.out_channels
    out = inverted_residual_output(args)
    out_h, out_w = out.shape[2], out.shape[3]
    tile = tiles(args)
    tiles_w = triton.cdiv(out_w, tile["TILE_W"])
    tiles_per_image = triton.cdiv(out_h, tile["TILE_H"]) * tiles_w
    dot_dtype, precision = _dot(x.dtype)
    expand_code, expand_param = _code_and_parameter(args.expand_activation)
    dw_code, dw_param = _code_and_parameter(args.dw_activation)
    post_code, post_param = _code_and_parameter(args.post_se_activation)
    project_code, project_param = _code_and_parameter(args.project_activation)
    w_expand = args.w_expand if args.w_expand is not None else args.w_dw  # never read without an expand conv
    b_expand = args.b_expand if args.b_expand is not None else args.b_dw
    if args.has_se:
        # d in x's dtype, channels innermost; float32 partial sums per (image, tile).
        d = torch.empty((batch, out_h, out_w, hidden), dtype=x.dtype, device=x.device)
        partial_sums = torch.empty((batch, tiles_per_image, hidden), dtype=torch.float32, device=x.device)
    else:
        d = partial_sums = out  # never written: the single-kernel form projects instead
    block = Launch(
        _block_kernel, (batch * tiles_per_image,),
        (x, w_expand, b_expand, args.w_dw, args.b_dw, args.w_project, args.b_project, out, d, partial_sums,
         channels, hidden, out_channels, height, width, out_h, out_w, tiles_w, tiles_per_image,
         *x.stride(), *out.stride(), args.padding[0], args.padding[2], expand_param, dw_param, project_param),
        dict(HAS_EXPAND=args.w_expand is not None, EXPAND_ACTIVATION=expand_code, DW_ACTIVATION=dw_code,
             PROJECT_ACTIVATION=project_code, RESIDUAL=args.residual, FIRST_STAGE=args.has_se,
             KH=int(args.w_dw.shape[2]), KW=int(args.w_dw.shape[3]), STRIDE_H=args.stride[0],
             STRIDE_W=args.stride[1], DIL_H=args.dilation[0], DIL_W=args.dilation[1],
             DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, **tile))
    if not args.has_se:
        return out, [block]
    scale = torch.empty((batch, hidden), dtype=torch.float32, device=x.device)
    mlp = mlp_launch(partial_sums, scale, args.w_se_reduce, args.b_se_reduce, args.w_se_expand, args.b_se_expand,
                     out_h * out_w, args.se_activation, args.se_gate)
    block_p = _block(out_h * out_w, 1024 if interpreting() else 32)
    pixel_blocks = triton.cdiv(out_h * out_w, block_p)
    project = Launch(
        _project_kernel, (batch * pixel_blocks,),
        (d, scale, args.w_project, args.b_project, x, out, hidden, out_channels, out_w, out_h * out_w, pixel_blocks,
         *x.stride(), *out.stride(), post_param, project_param),
        dict(POST_SE_ACTIVATION=post_code, PROJECT_ACTIVATION=project_code, RESIDUAL=args.residual,
             DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, BLOCK_P=block_p, BLOCK_E=tile["BLOCK_E"],
             BLOCK_O=tile["BLOCK_O"], num_warps=tile["num_warps"]))
    return out, [block, mlp, project]


def launch(args: BlockArgs) -> torch.Tensor:
    out, launches = plan(args)
    run_launches(launches, args.x)
    return out


def limit(args: BlockArgs, interpreter: Optional[bool] = None):
    """Why the kernel declines a block (None: it runs it); interpreter as for `tiles`."""
    interpreter = interpreting() if interpreter is None else interpreter
    if args.out_channels > MAX_OUT_CHANNELS:
        return (f"O = {args.out_channels} output channels; the Triton block kernel holds at most "
                f"{MAX_OUT_CHANNELS} in its accumulator")
    tile = tiles(args, interpreter)
    if tile["HALO_P"] > MAX_HALO_PIXELS[interpreter]:
        return (f"the input halo of a {tile['TILE_H']}x{tile['TILE_W']} tile is {tile['HALO_H']}x{tile['HALO_W']} "
                f"pixels (kernel, stride and dilation); the Triton block kernel holds at most "
                f"{MAX_HALO_PIXELS[interpreter]}")
    if args.has_se and args.w_se_reduce.shape[0] > MAX_REDUCED_CHANNELS:
        return f"R = {args.w_se_reduce.shape[0]} SE channels; the Triton MLP holds at most {MAX_REDUCED_CHANNELS}"
    return None


def l2_reads(args: BlockArgs) -> float:
    """Bytes the GPU tiles read per input pixel from L2 beyond what HBM must deliver once: every tile reads all
    float32 weights. (Each hidden-channel step reads the tile's x halo again too, at most 64 KiB: L1 serves it.)"""
    tile = tiles(args, interpreter=False)
    weights = sum(t.numel() for t in (args.w_expand, args.w_dw, args.w_project, args.w_se_reduce, args.w_se_expand)
                  if t is not None) * 4
    return weights / (tile["TILE_H"] * tile["TILE_W"] * args.stride[0] * args.stride[1])


def expand_recompute(args: BlockArgs) -> float:
    """How many times the GPU tiles compute the expand conv per input pixel (1.0: none recomputed): the halo
    tile, padded to a power of two, over the input pixels the tile's outputs own."""
    if args.w_expand is None:
        return 1.0
    tile = tiles(args, interpreter=False)
    return tile["HALO_P"] / (tile["TILE_H"] * tile["TILE_W"] * args.stride[0] * args.stride[1])
