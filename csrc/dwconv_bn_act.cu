// Depthwise conv2d + folded-BatchNorm bias + activation: CUDA kernels, their launcher, and the host emulation.
//
// The op is memory-bound: every kernel reads x about once and writes y once, accumulates in float32 (fmaf), and
// applies the activation (a warp-uniform runtime switch, not a template parameter) before the single store.
// Output channel o reads input channel o / M (depth multiplier M = C_out / C). Weights are tap-major,
// weight[(i * kw + j) * C_out + o], so a vector of channels of one tap is one 16-byte load. Padding is
// [top, bottom, left, right]; the kernels see only top and left (bottom and right only set the output size).
// Fast paths are templated on the square kernel size K in {3, 5, 7} and the stride S in {1, 2} (dilation 1, any
// padding, M == 1 for channels_last); every other shape takes the generic path of its layout.
//
// channels_last (x[n, h, w, c]): one thread per (n, oh, a run of output pixels along W, a vector of channels).
//   Consecutive threads take consecutive channel vectors, so a warp's loads and stores are contiguous. The vector
//   is 16 bytes (8 half/bfloat16 or 4 float) when M == 1, C and the pointers allow it.
//   - fast <T, K, S, PIX>: PIX output pixels per thread (16 accumulators' worth: 4 for float, 2 for 16-bit
//     types; 1 when that leaves the GPU idle); per kernel row all input columns are loaded first, predicated
//     (zeros outside the plane, no branch), so they are in flight together; each weight vector is loaded once
//     per tap and feeds every output pixel it touches.
//   Small grids (batch 1) also get smaller blocks, down to one warp, so that every SM has work.
//   - generic <T, VEC>: 1 output pixel per thread, runtime loops; VEC = 16 bytes or 1 (the scalar fallback for
//     M > 1, C not a multiple of the vector width or unaligned pointers, whatever the kernel shape).
// NCHW (x[n, c, h, w]): one block per spatial tile of one or more (n, o) output planes (several small planes per
//   block). Phase 1 stages the tile's input with its halo in shared memory as float (zeros outside the plane),
//   in 16-byte vectors when W is a multiple of the vector; phase 2 computes: thread (tx, ty, plane) owns output
//   column tx and a run of rows, so a warp reads consecutive shared words and writes consecutive output elements.
//   - fast <T, K, S>: 4 output rows per thread, input rows stream through and feed every output row they touch;
//     the K x K weights of the plane's channel sit in registers.
//   - generic <T>: 1 output row per thread, runtime loops.
//   Tile sizes are picked per shape by plan_nchw_tiles (at most 256 threads, 48 KiB of shared memory).
//
// Emulation (kernel_utils.cuh): the thread bodies below are __host__ __device__ functions of (params, block,
// thread[, shared memory]). The channels_last kernels have one phase; the NCHW kernels two (stage, barrier,
// compute). On CPU tensors the launcher runs the same plan and the same thread bodies on the host.
#include "activations.cuh"
#include "kernel_utils.cuh"
#include "ops.h"

#include <string>
#include <type_traits>

namespace mbkernels {
namespace {

constexpr int kChannelsLastThreads = 256;
constexpr int kMinChannelsLastThreads = 32;
// channels_last fast path: output pixels along W per thread, so that a thread holds 16 accumulators (4 float or
// 2 half/bfloat16 vectors): more leave too few registers for the input columns in flight.
template <class T>
constexpr int kPixelsPerThread = 16 / kVec16<T>;
constexpr int kRowsPerThread = 4;    // NCHW fast path: output rows per thread
constexpr int kMaxTileThreads = 256;
constexpr int kMaxTileColumns = 32;

struct DwconvParams {
  const void* x;
  void* y;
  const float* weight;  // tap-major: [kh * kw][C_out]
  const float* bias;    // [C_out]
  int N, C, H, W, CO, M, OH, OW;
  int KH, KW, SH, SW, PT, PL, DH, DW;  // PT, PL: top and left padding
  ActivationSpec activation;
  // channels_last: threads in the grid (one per work item).
  int64_t items;
  // NCHW tiles: tile_x output columns x tile_y row runs per plane, `planes` planes per block.
  int tile_x, tile_y, planes, tiles_w, tiles_h, in_tile_h, in_tile_w;
  bool stage_vectors;  // NCHW: x's rows are whole 16-byte vectors (W a multiple of the vector, x aligned)
};

MBK_HOST_DEVICE bool inside(int i, int size) { return static_cast<unsigned>(i) < static_cast<unsigned>(size); }

// ------------------------------------------------------------------------------------- channels_last kernels
template <class T, int K, int S, int PIX>
MBK_HOST_DEVICE void dwconv_cl_fast_thread(const DwconvParams& p, int64_t block, int thread, int threads) {
  constexpr int VEC = kVec16<T>;
  constexpr int COLUMNS = (PIX - 1) * S + K;  // input columns feeding PIX consecutive output pixels
  const int64_t item = block * threads + thread;
  if (item >= p.items) return;
  const int vectors = p.C / VEC;  // M == 1: C_out == C
  const int runs = ceil_div(p.OW, PIX);
  const int64_t row = item / (int64_t(runs) * vectors);  // n * OH + oh
  const int in_row = static_cast<int>(item - row * runs * vectors);
  const int run = in_row / vectors;
  const int c0 = (in_row - run * vectors) * VEC;
  const int oh = static_cast<int>(row % p.OH);
  const int64_t n = row / p.OH;
  const int ow0 = run * PIX;
  const int ih0 = oh * S - p.PT;
  const int iw0 = ow0 * S - p.PL;

  float acc[PIX][VEC];
  {
    float b[VEC];
    load_floats<float, VEC>(p.bias + c0, b);
#pragma unroll
    for (int q = 0; q < PIX; ++q)
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[q][v] = b[v];
  }
  const T* x = static_cast<const T*>(p.x) + n * p.H * p.W * p.C + c0;
  // Rows one at a time (not unrolled): unrolled, the compiler hoists the next rows' loads and runs out of
  // registers; within a row all COLUMNS loads are in flight together.
#pragma unroll 1
  for (int kh = 0; kh < K; ++kh) {
    const int ih = ih0 + kh;
    const T* x_row = x + int64_t(ih) * p.W * p.C;
    Pack<T, VEC> columns[COLUMNS];
#pragma unroll
    for (int j = 0; j < COLUMNS; ++j)
      columns[j] = load_pack_if<T, VEC>(x_row + (iw0 + j) * p.C, inside(ih, p.H) && inside(iw0 + j, p.W));
#pragma unroll
    for (int kw = 0; kw < K; ++kw) {
      float w[VEC];
      load_floats<float, VEC>(p.weight + (kh * K + kw) * p.C + c0, w);
#pragma unroll
      for (int q = 0; q < PIX; ++q)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[q][v] = fmaf(w[v], to_float(columns[q * S + kw].v[v]), acc[q][v]);
    }
  }
  T* y = static_cast<T*>(p.y) + (row * p.OW + ow0) * p.C + c0;
#pragma unroll
  for (int q = 0; q < PIX; ++q) {
    if (ow0 + q < p.OW) {
      apply_activation(acc[q], p.activation);
      store_floats<T, VEC>(y + q * p.C, acc[q]);
    }
  }
}

template <class T, int VEC>
MBK_HOST_DEVICE void dwconv_cl_generic_thread(const DwconvParams& p, int64_t block, int thread, int threads) {
  const int64_t item = block * threads + thread;
  if (item >= p.items) return;
  const int vectors = p.CO / VEC;
  const int64_t pixel = item / vectors;  // (n * OH + oh) * OW + ow
  const int c0 = static_cast<int>(item - pixel * vectors) * VEC;
  const int64_t row = pixel / p.OW;
  const int ow = static_cast<int>(pixel - row * p.OW);
  const int oh = static_cast<int>(row % p.OH);
  const int64_t n = row / p.OH;

  float acc[VEC];
  load_floats<float, VEC>(p.bias + c0, acc);
  const T* x = static_cast<const T*>(p.x) + n * p.H * p.W * p.C + c0 / p.M;  // VEC > 1 only when M == 1
  for (int kh = 0; kh < p.KH; ++kh) {
    const int ih = oh * p.SH - p.PT + kh * p.DH;
    if (!inside(ih, p.H)) continue;
    for (int kw = 0; kw < p.KW; ++kw) {
      const int iw = ow * p.SW - p.PL + kw * p.DW;
      if (!inside(iw, p.W)) continue;
      float xv[VEC], w[VEC];
      load_floats<T, VEC>(x + (ih * p.W + iw) * p.C, xv);
      load_floats<float, VEC>(p.weight + (kh * p.KW + kw) * p.CO + c0, w);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = fmaf(w[v], xv[v], acc[v]);
    }
  }
  apply_activation(acc, p.activation);
  store_floats<T, VEC>(static_cast<T*>(p.y) + pixel * p.CO + c0, acc);
}

template <class T, int K, int S, int PIX>
__global__ void __launch_bounds__(kChannelsLastThreads) dwconv_cl_fast_kernel(const DwconvParams p) {
  dwconv_cl_fast_thread<T, K, S, PIX>(p, blockIdx.x, threadIdx.x, blockDim.x);
}

template <class T, int VEC>
__global__ void __launch_bounds__(kChannelsLastThreads) dwconv_cl_generic_kernel(const DwconvParams p) {
  dwconv_cl_generic_thread<T, VEC>(p, blockIdx.x, threadIdx.x, blockDim.x);
}

// --------------------------------------------------------------------------------------------- NCHW kernels
struct TileOrigin {
  int plane0;     // first (n * C_out + o) plane of the block
  int oh0, ow0;   // first output row / column of the tile
};

MBK_HOST_DEVICE TileOrigin tile_origin(const DwconvParams& p, int64_t block, int rows_per_thread) {
  const int b = static_cast<int>(block);
  const int tw = b % p.tiles_w;
  const int rest = b / p.tiles_w;
  const int th = rest % p.tiles_h;
  return {rest / p.tiles_h * p.planes, th * p.tile_y * rows_per_thread, tw * p.tile_x};
}

// Phase 1: the block's input tiles (halo included, zeros outside the plane) into smem[plane][row][column], read
// in units of UNIT elements aligned to the row (16-byte vectors when the rows allow, else single elements).
template <class T, int UNIT>
MBK_HOST_DEVICE void dwconv_nchw_stage_units(const DwconvParams& p, const TileOrigin& origin, int thread,
                                             int threads, float* smem) {
  const int ih0 = origin.oh0 * p.SH - p.PT;
  const int iw0 = origin.ow0 * p.SW - p.PL;
  const int first = floor_div(iw0, UNIT) * UNIT;  // the first unit's column: aligned, at or left of iw0
  const int units = ceil_div(iw0 + p.in_tile_w - first, UNIT);
  // Threads cover `unit_threads` units of `row_step` rows at a time; rows advance without divisions.
  const int unit_threads = units < threads ? units : threads;
  const int row_step = threads / unit_threads;
  if (thread >= row_step * unit_threads) return;
  const int planes_total = p.N * p.CO;
  int plane = 0;
  int r = thread / unit_threads;
  while (r >= p.in_tile_h) {
    r -= p.in_tile_h;
    ++plane;
  }
  for (; plane < p.planes;) {
    const int out_plane = origin.plane0 + plane;  // n * C_out + o reads input plane n * C + o / M
    const int n = out_plane / p.CO;
    const int64_t in_plane = int64_t(n) * p.C + (out_plane - n * p.CO) / p.M;
    const int ih = ih0 + r;
    const bool row_inside = out_plane < planes_total && inside(ih, p.H);
    const T* x_row = static_cast<const T*>(p.x) + (in_plane * p.H + ih) * p.W;
    float* s_row = smem + (plane * p.in_tile_h + r) * p.in_tile_w - iw0;  // indexed by input column
    for (int u = thread % unit_threads; u < units; u += unit_threads) {
      const int iw = first + u * UNIT;  // a unit lies wholly inside the row or wholly outside (UNIT divides W)
      const Pack<T, UNIT> values = load_pack_if<T, UNIT>(x_row + iw, row_inside && inside(iw, p.W));
#pragma unroll
      for (int e = 0; e < UNIT; ++e)
        if (inside(iw + e - iw0, p.in_tile_w)) s_row[iw + e] = to_float(values.v[e]);
    }
    r += row_step;
    while (r >= p.in_tile_h) {
      r -= p.in_tile_h;
      ++plane;
    }
  }
}

template <class T>
MBK_HOST_DEVICE void dwconv_nchw_stage_thread(const DwconvParams& p, int64_t block, int thread, int threads,
                                              float* smem, int rows_per_thread) {
  const TileOrigin origin = tile_origin(p, block, rows_per_thread);
  if (p.stage_vectors)
    dwconv_nchw_stage_units<T, kVec16<T>>(p, origin, thread, threads, smem);
  else
    dwconv_nchw_stage_units<T, 1>(p, origin, thread, threads, smem);
}

struct TileThread {
  int plane;  // global (n * C_out + o) plane, or -1 when the thread has no output
  int o, oh0, ow, tx, ty;
  int tile_plane;  // the plane's index in the block's shared memory
};

MBK_HOST_DEVICE TileThread tile_thread(const DwconvParams& p, int64_t block, int thread, int rows_per_thread) {
  const TileOrigin origin = tile_origin(p, block, rows_per_thread);
  const int tx = thread % p.tile_x;
  const int ty = thread / p.tile_x % p.tile_y;
  const int tile_plane = thread / (p.tile_x * p.tile_y);
  TileThread t{-1, 0, origin.oh0 + ty * rows_per_thread, origin.ow0 + tx, tx, ty, tile_plane};
  const int plane = origin.plane0 + tile_plane;
  if (tile_plane < p.planes && plane < p.N * p.CO && t.ow < p.OW && t.oh0 < p.OH) {
    t.plane = plane;
    t.o = plane % p.CO;
  }
  return t;
}

// Phase 2, fast path: kRowsPerThread output rows of one column from the staged tile.
template <class T, int K, int S>
MBK_HOST_DEVICE void dwconv_nchw_fast_compute_thread(const DwconvParams& p, int64_t block, int thread,
                                                     const float* smem) {
  constexpr int ROWS = kRowsPerThread;
  constexpr int IN_ROWS = (ROWS - 1) * S + K;
  const TileThread t = tile_thread(p, block, thread, ROWS);
  if (t.plane < 0) return;
  float w[K][K];
#pragma unroll
  for (int kh = 0; kh < K; ++kh)
#pragma unroll
    for (int kw = 0; kw < K; ++kw) w[kh][kw] = load_ro(p.weight + (kh * K + kw) * p.CO + t.o);
  const float b = load_ro(p.bias + t.o);
  float acc[ROWS];
#pragma unroll
  for (int q = 0; q < ROWS; ++q) acc[q] = b;
  const float* s = smem + (t.tile_plane * p.in_tile_h + t.ty * ROWS * S) * p.in_tile_w + t.tx * S;
#pragma unroll
  for (int j = 0; j < IN_ROWS; ++j) {
    float xv[K];
#pragma unroll
    for (int kw = 0; kw < K; ++kw) xv[kw] = s[j * p.in_tile_w + kw];
#pragma unroll
    for (int q = 0; q < ROWS; ++q) {
      const int kh = j - q * S;
      if (kh < 0 || kh >= K) continue;
#pragma unroll
      for (int kw = 0; kw < K; ++kw) acc[q] = fmaf(w[kh][kw], xv[kw], acc[q]);
    }
  }
  T* y = static_cast<T*>(p.y) + (int64_t(t.plane) * p.OH + t.oh0) * p.OW + t.ow;
#pragma unroll
  for (int q = 0; q < ROWS; ++q)
    if (t.oh0 + q < p.OH) y[q * p.OW] = from_float<T>(apply_activation(acc[q], p.activation));
}

// Phase 2, generic path: one output element from the staged tile.
template <class T>
MBK_HOST_DEVICE void dwconv_nchw_generic_compute_thread(const DwconvParams& p, int64_t block, int thread,
                                                        const float* smem) {
  const TileThread t = tile_thread(p, block, thread, 1);
  if (t.plane < 0) return;
  const float* s = smem + (t.tile_plane * p.in_tile_h + t.ty * p.SH) * p.in_tile_w + t.tx * p.SW;
  float acc = load_ro(p.bias + t.o);
  for (int kh = 0; kh < p.KH; ++kh)
    for (int kw = 0; kw < p.KW; ++kw)
      acc = fmaf(load_ro(p.weight + (kh * p.KW + kw) * p.CO + t.o), s[kh * p.DH * p.in_tile_w + kw * p.DW], acc);
  static_cast<T*>(p.y)[(int64_t(t.plane) * p.OH + t.oh0) * p.OW + t.ow] =
      from_float<T>(apply_activation(acc, p.activation));
}

template <class T, int K, int S>
__global__ void __launch_bounds__(kMaxTileThreads) dwconv_nchw_fast_kernel(const DwconvParams p) {
  extern __shared__ float smem[];
  dwconv_nchw_stage_thread<T>(p, blockIdx.x, threadIdx.x, blockDim.x, smem, kRowsPerThread);
  __syncthreads();
  dwconv_nchw_fast_compute_thread<T, K, S>(p, blockIdx.x, threadIdx.x, smem);
}

template <class T>
__global__ void __launch_bounds__(kMaxTileThreads) dwconv_nchw_generic_kernel(const DwconvParams p) {
  extern __shared__ float smem[];
  dwconv_nchw_stage_thread<T>(p, blockIdx.x, threadIdx.x, blockDim.x, smem, 1);
  __syncthreads();
  dwconv_nchw_generic_compute_thread<T>(p, blockIdx.x, threadIdx.x, smem);
}

// -------------------------------------------------------------------------------------------------- plans
// Calls run<K, S>() for a fast-path shape and returns true, else returns false.
template <class Run>
bool with_fast_shape(const DwconvParams& p, Run&& run) {
  if (p.KH != p.KW || p.SH != p.SW || p.DH != 1 || p.DW != 1) return false;
  using std::integral_constant;
  switch (p.KH * 10 + p.SH) {
    case 31: run(integral_constant<int, 3>{}, integral_constant<int, 1>{}); return true;
    case 32: run(integral_constant<int, 3>{}, integral_constant<int, 2>{}); return true;
    case 51: run(integral_constant<int, 5>{}, integral_constant<int, 1>{}); return true;
    case 52: run(integral_constant<int, 5>{}, integral_constant<int, 2>{}); return true;
    case 71: run(integral_constant<int, 7>{}, integral_constant<int, 1>{}); return true;
    case 72: run(integral_constant<int, 7>{}, integral_constant<int, 2>{}); return true;
    default: return false;
  }
}

bool has_fast_shape(const DwconvParams& p) {
  return with_fast_shape(p, [](auto, auto) {});
}

// NCHW tiles: output columns split evenly into runs of <= 32, row runs so a plane's tile has <= 256 threads, and
// whole small planes packed several per block (keeping >= 256 blocks when there are that many planes). Large
// kernels or dilations shrink the tile down to one output pixel; the caller checks that its halo fits.
LaunchShape plan_nchw_tiles(DwconvParams& p, int rows_per_thread) {
  const int64_t planes_total = int64_t(p.N) * p.CO;
  int tiles_w = ceil_div(p.OW, kMaxTileColumns);
  p.tile_x = ceil_div(p.OW, tiles_w);
  const int row_runs = ceil_div(p.OH, rows_per_thread);
  const int max_tile_y = std::max(1, kMaxTileThreads / p.tile_x);
  p.tiles_h = ceil_div(row_runs, max_tile_y);
  p.tile_y = ceil_div(row_runs, p.tiles_h);
  int64_t planes = 1;
  if (tiles_w == 1 && p.tiles_h == 1)
    planes = std::min<int64_t>(kMaxTileThreads / (p.tile_x * p.tile_y), std::max<int64_t>(1, planes_total / 256));
  auto in_rows = [&] { return (p.tile_y * rows_per_thread - 1) * p.SH + (p.KH - 1) * p.DH + 1; };
  auto in_cols = [&] { return (p.tile_x - 1) * p.SW + (p.KW - 1) * p.DW + 1; };
  auto smem_bytes = [&] { return planes * in_rows() * in_cols() * int64_t(sizeof(float)); };
  while (smem_bytes() > kDefaultSmemBytes && (planes > 1 || p.tile_y > 1 || p.tile_x > 1)) {
    if (planes > 1) {
      planes = (planes + 1) / 2;
    } else if (p.tile_y > 1) {
      p.tile_y = (p.tile_y + 1) / 2;
      p.tiles_h = ceil_div(row_runs, p.tile_y);
    } else {
      p.tile_x = (p.tile_x + 1) / 2;
      tiles_w = ceil_div(p.OW, p.tile_x);
    }
  }
  p.planes = static_cast<int>(planes);
  p.tiles_w = tiles_w;
  p.in_tile_h = in_rows();
  p.in_tile_w = in_cols();
  return {ceil_div<int64_t>(planes_total, planes) * p.tiles_h * p.tiles_w, p.tile_x * p.tile_y * p.planes,
          planes * p.in_tile_h * p.in_tile_w};
}

LaunchShape plan_nchw(DwconvParams& p) { return plan_nchw_tiles(p, has_fast_shape(p) ? kRowsPerThread : 1); }

// channels_last: one thread per work item (`pixels` output pixels x `vec` channels); blocks shrink (down to a
// warp) while the grid would leave SMs idle.
LaunchShape plan_channels_last(DwconvParams& p, int pixels, int vec) {
  p.items = int64_t(p.N) * p.OH * ceil_div(p.OW, pixels) * (p.CO / vec);
  int threads = kChannelsLastThreads;
  while (threads > kMinChannelsLastThreads && ceil_div<int64_t>(p.items, threads) < kFillBlocks) threads /= 2;
  return {ceil_div<int64_t>(p.items, threads), threads, 0};
}

// Whether the fast path's pixels per thread still give enough blocks (of the smallest size) to fill the GPU.
bool wide_items_fill_the_gpu(const DwconvParams& p, int pixels, int vec) {
  const int64_t items = int64_t(p.N) * p.OH * ceil_div(p.OW, pixels) * (p.CO / vec);
  return items >= kFillBlocks * kMinChannelsLastThreads;
}

// ----------------------------------------------------------------------------------- checks and parameters
struct OutputSize {
  int64_t h, w;
};

OutputSize output_size(const DwconvShape& s) {
  return {(s.H + s.padding[0] + s.padding[1] - s.dilation[0] * (s.kh - 1) - 1) / s.stride[0] + 1,
          (s.W + s.padding[2] + s.padding[3] - s.dilation[1] * (s.kw - 1) - 1) / s.stride[1] + 1};
}

// The kernels' parameters for a shape that dwconv_bn_act_limit_reason accepts (pointers left null).
DwconvParams shape_params(const DwconvShape& s) {
  const OutputSize out = output_size(s);
  DwconvParams p{};
  p.N = static_cast<int>(s.N);
  p.C = static_cast<int>(s.C);
  p.H = static_cast<int>(s.H);
  p.W = static_cast<int>(s.W);
  p.CO = static_cast<int>(s.C_out);
  p.M = s.C > 0 ? static_cast<int>(s.C_out / s.C) : 1;
  p.OH = static_cast<int>(out.h);
  p.OW = static_cast<int>(out.w);
  p.KH = static_cast<int>(s.kh);
  p.KW = static_cast<int>(s.kw);
  p.SH = static_cast<int>(s.stride[0]);
  p.SW = static_cast<int>(s.stride[1]);
  p.PT = static_cast<int>(s.padding[0]);
  p.PL = static_cast<int>(s.padding[2]);
  p.DH = static_cast<int>(s.dilation[0]);
  p.DW = static_cast<int>(s.dilation[1]);
  return p;
}

void check_dwconv_tensors(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  MBK_CHECK(x.dim() == 4, "dwconv_bn_act_cuda: x must be [N, C, H, W], got ", list_text(x.sizes()));
  MBK_CHECK(x.is_contiguous() || is_channels_last_contiguous(x),
            "dwconv_bn_act_cuda: x must be contiguous (NCHW or channels_last), got strides ", list_text(x.strides()));
  MBK_CHECK(weight.dim() == 4 && weight.size(1) == 1, "dwconv_bn_act_cuda: weight must be [C_out, 1, kh, kw], got ",
            list_text(weight.sizes()));
  MBK_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), "dwconv_bn_act_cuda: bias must be [", weight.size(0),
            "], got ", list_text(bias.sizes()));
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    MBK_CHECK(t->scalar_type() == ScalarType::Float, "dwconv_bn_act_cuda: ", name, " must be float32, got ",
              t->scalar_type());
    MBK_CHECK(t->device() == x.device(), "dwconv_bn_act_cuda: ", name, " is on ", device_text(*t), " but x is on ",
              device_text(x));
  }
}

// The view itself when it is contiguous and 16-byte aligned, else an aligned contiguous copy of it.
Tensor aligned_contiguous(const Tensor& contiguous_view) {
  if (contiguous_view.is_contiguous() && aligned16(contiguous_view.data_ptr())) return contiguous_view;
  Tensor copy = empty_on(contiguous_view, contiguous_view.sizes(), contiguous_view.scalar_type());
  torch::stable::copy_(copy, contiguous_view);
  return copy;
}

template <class T>
void launch_dwconv(DwconvParams& p, bool channels_last, const Executor& ex) {
  if (!channels_last) {
    p.stage_vectors = p.W % kVec16<T> == 0 && aligned16(p.x);
    const LaunchShape shape = plan_nchw(p);
    const bool fast = with_fast_shape(p, [&](auto k, auto s) {
      constexpr int K = decltype(k)::value, S = decltype(s)::value;
      launch_or_emulate<dwconv_nchw_fast_kernel<T, K, S>>(ex, shape, p, [&](int64_t block, float* smem) {
        emulate_phase(shape.threads, [&](int t) {
          dwconv_nchw_stage_thread<T>(p, block, t, shape.threads, smem, kRowsPerThread);
        });
        emulate_phase(shape.threads, [&](int t) { dwconv_nchw_fast_compute_thread<T, K, S>(p, block, t, smem); });
      });
    });
    if (fast) return;
    launch_or_emulate<dwconv_nchw_generic_kernel<T>>(ex, shape, p, [&](int64_t block, float* smem) {
      emulate_phase(shape.threads, [&](int t) { dwconv_nchw_stage_thread<T>(p, block, t, shape.threads, smem, 1); });
      emulate_phase(shape.threads, [&](int t) { dwconv_nchw_generic_compute_thread<T>(p, block, t, smem); });
    });
    return;
  }
  constexpr int VEC = kVec16<T>;
  const bool vectorized = p.M == 1 && p.CO % VEC == 0 && aligned16(p.x) && aligned16(p.y);
  auto run_fast = [&](auto pixels) {
    constexpr int PIX = decltype(pixels)::value;
    return with_fast_shape(p, [&](auto k, auto s) {
      constexpr int K = decltype(k)::value, S = decltype(s)::value;
      const LaunchShape shape = plan_channels_last(p, PIX, VEC);
      launch_or_emulate<dwconv_cl_fast_kernel<T, K, S, PIX>>(ex, shape, p, [&](int64_t block, float*) {
        emulate_phase(shape.threads, [&](int t) { dwconv_cl_fast_thread<T, K, S, PIX>(p, block, t, shape.threads); });
      });
    });
  };
  constexpr int PIX = kPixelsPerThread<T>;
  if (vectorized && (wide_items_fill_the_gpu(p, PIX, VEC) ? run_fast(std::integral_constant<int, PIX>{})
                                                          : run_fast(std::integral_constant<int, 1>{})))
    return;
  auto run_generic = [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    const LaunchShape shape = plan_channels_last(p, 1, V);
    launch_or_emulate<dwconv_cl_generic_kernel<T, V>>(ex, shape, p, [&](int64_t block, float*) {
      emulate_phase(shape.threads, [&](int t) { dwconv_cl_generic_thread<T, V>(p, block, t, shape.threads); });
    });
  };
  if (vectorized)
    run_generic(std::integral_constant<int, VEC>{});
  else
    run_generic(std::integral_constant<int, 1>{});
}

}  // namespace

std::string dwconv_bn_act_limit_reason(const DwconvShape& s) {
  if (s.stride[0] < 1 || s.stride[1] < 1) return "stride must be two ints >= 1, got " + list_text(s.stride);
  if (*std::min_element(s.padding.begin(), s.padding.end()) < 0)
    return "padding must be four ints >= 0 ([top, bottom, left, right]), got " + list_text(s.padding);
  if (s.dilation[0] < 1 || s.dilation[1] < 1)
    return "dilation must be two ints >= 1, got " + list_text(s.dilation);
  if (s.C_out < s.C || (s.C > 0 && s.C_out % s.C != 0) || (s.C == 0 && s.C_out != 0))
    return "weight has " + std::to_string(s.C_out) + " output channels, not a multiple (depth multiplier >= 1) of "
           "x's " + std::to_string(s.C) + " channels";
  const OutputSize out = output_size(s);
  if (s.kh < 1 || s.kw < 1 || out.h < 1 || out.w < 1)
    return "kernel " + std::to_string(s.kh) + "x" + std::to_string(s.kw) + " with dilation " +
           list_text(s.dilation) + " does not fit x's " + std::to_string(s.H) + "x" + std::to_string(s.W) +
           " plane padded by " + list_text(s.padding);
  const int64_t padding = *std::max_element(s.padding.begin(), s.padding.end());
  if (std::max({s.H * s.W * s.C, out.h * out.w * s.C_out, s.C_out * s.kh * s.kw, s.N * s.C_out,
                s.stride[0] * out.h + s.dilation[0] * s.kh, s.stride[1] * out.w + s.dilation[1] * s.kw,
                4 * padding}) >= kInt32Limit)
    return "one sample of x [" + std::to_string(s.N) + ", " + std::to_string(s.C) + ", " + std::to_string(s.H) +
           ", " + std::to_string(s.W) + "] is too large for the kernels' 32-bit offsets within a sample";
  DwconvParams p = shape_params(s);
  // The plan with the most blocks for this layout: NCHW tiles, or one channels_last thread per output element.
  const LaunchShape shape = s.channels_last ? plan_channels_last(p, 1, 1) : plan_nchw(p);
  if (shape.smem_floats * int64_t(sizeof(float)) > kDefaultSmemBytes)
    return "kernel " + std::to_string(s.kh) + "x" + std::to_string(s.kw) + " with dilation " +
           list_text(s.dilation) + " needs " + std::to_string(shape.smem_floats * sizeof(float)) +
           " bytes of shared memory per NCHW tile, over " + std::to_string(kDefaultSmemBytes) +
           "; channels_last input runs";
  if (shape.blocks >= kInt32Limit) return "x is too large (" + std::to_string(shape.blocks) + " blocks)";
  return "";
}

Tensor dwconv_bn_act_cuda(const Tensor& x, const Tensor& weight, const Tensor& bias, IntHeaderOnlyArrayRef stride,
                          IntHeaderOnlyArrayRef padding, IntHeaderOnlyArrayRef dilation, std::string_view activation) {
  check_dwconv_tensors(x, weight, bias);
  const ActivationSpec spec = parse_activation(activation, "dwconv_bn_act_cuda");
  MBK_CHECK(stride.size() == 2, "dwconv_bn_act_cuda: stride must be two ints, got ", list_text(stride));
  MBK_CHECK(padding.size() == 4, "dwconv_bn_act_cuda: padding must be four ints [top, bottom, left, right], got ",
            list_text(padding));
  MBK_CHECK(dilation.size() == 2, "dwconv_bn_act_cuda: dilation must be two ints, got ", list_text(dilation));
  const bool channels_last = is_channels_last(x);
  const DwconvShape shape{x.size(0),
                          x.size(1),
                          x.size(2),
                          x.size(3),
                          channels_last,
                          weight.size(0),
                          weight.size(2),
                          weight.size(3),
                          {stride[0], stride[1]},
                          {padding[0], padding[1], padding[2], padding[3]},
                          {dilation[0], dilation[1]}};
  const std::string limit = dwconv_bn_act_limit_reason(shape);
  MBK_CHECK(limit.empty(), "dwconv_bn_act_cuda: ", limit);

  const OutputSize out = output_size(shape);
  const std::array<int64_t, 4> y_sizes{shape.N, shape.C_out, out.h, out.w};
  Tensor y = empty_on(x, y_sizes, x.scalar_type(), channels_last);
  if (y.numel() == 0) return y;
  // The kernels read weight[(i * kw + j) * C_out + o] and vectors of it: [kh, kw, 1, C_out] contiguous, aligned.
  const std::array<int64_t, 4> tap_major{2, 3, 1, 0};
  const Tensor taps = aligned_contiguous(torch::stable::permute(weight, tap_major));
  const Tensor bias_vector = aligned_contiguous(bias);

  DwconvParams p = shape_params(shape);
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.weight = static_cast<const float*>(taps.data_ptr());
  p.bias = static_cast<const float*>(bias_vector.data_ptr());
  p.activation = spec;
  const Executor ex(x);
  dispatch_float_types(x.scalar_type(), "dwconv_bn_act_cuda: x", [&](auto tag) {
    launch_dwconv<decltype(tag)>(p, channels_last, ex);
  });
  return y;
}

std::vector<KernelLaunch> dwconv_bn_act_launch_plan(const DwconvShape& s, ScalarType dtype) {
  const std::string limit = dwconv_bn_act_limit_reason(s);
  MBK_CHECK(limit.empty(), "dwconv_bn_act_launch_plan: ", limit);
  std::vector<KernelLaunch> plan;
  const OutputSize out = output_size(s);
  if (s.N * s.C_out * out.h * out.w == 0) return plan;  // the op launches nothing
  DwconvParams p = shape_params(s);
  p.x = p.y = planning_address();
  p.weight = p.bias = static_cast<const float*>(planning_address());
  dispatch_float_types(dtype, "dwconv_bn_act_launch_plan: dtype", [&](auto tag) {
    launch_dwconv<decltype(tag)>(p, s.channels_last, Executor(&plan));
  });
  return plan;
}

}  // namespace mbkernels
