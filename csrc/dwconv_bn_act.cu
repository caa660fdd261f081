// Depthwise conv2d + folded-BatchNorm bias + activation: CUDA kernels, their launcher, and the host emulation.
//
// The op is memory-bound: every kernel reads x about once and writes y once, accumulates in float32 (fmaf), and
// applies the activation (a warp-uniform runtime switch, not a template parameter) before the single store.
// Fast paths are templated on the square kernel size K in {3, 5, 7} and the stride S in {1, 2} (dilation 1, any
// padding); every other shape (any kh x kw, stride, dilation, padding) takes the generic path of its layout.
//
// channels_last (x[n, h, w, c]): one thread per (n, oh, a run of output pixels along W, a vector of channels).
//   Consecutive threads take consecutive channel vectors, so a warp's loads and stores are contiguous. The vector
//   is 16 bytes (8 half/bfloat16 or 4 float) when C and the pointers allow it.
//   - fast <T, K, S>: 4 output pixels per thread; the input columns of one kernel row stream through registers and
//     each feeds every output pixel it touches; the row's K x 8 weights sit in registers.
//   - generic <T, VEC>: 1 output pixel per thread, runtime loops; VEC = 16 bytes or 1 (the scalar fallback for C
//     not a multiple of the vector width or unaligned pointers, whatever the kernel shape).
// NCHW (x[n, c, h, w]): one block per spatial tile of one or more (n, c) planes (several small planes per block).
//   Phase 1 stages the tile's input with its halo in shared memory as float (zeros outside the plane); phase 2
//   computes: thread (tx, ty, plane) owns output column tx and a run of rows, so a warp reads consecutive shared
//   words and writes consecutive output elements.
//   - fast <T, K, S>: 4 output rows per thread, input rows stream through and feed every output row they touch;
//     the K x K weights of the plane's channel sit in registers.
//   - generic <T>: 1 output row per thread, runtime loops.
//   Tile sizes are picked per shape by plan_nchw_tiles (at most 256 threads, 48 KiB of shared memory).
//
// Emulation (kernel_utils.cuh): the thread bodies below are __host__ __device__ functions of (params, block,
// thread[, shared memory]). The channels_last kernels have one phase; the NCHW kernels two (stage, barrier,
// compute). dwconv_bn_act_emulated runs the same plan and the same thread bodies on CPU tensors.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "activations.cuh"
#include "kernel_utils.cuh"
#include "ops.h"

#include <optional>
#include <type_traits>
#include <utility>

namespace mbkernels {
namespace {

constexpr int kChannelsLastThreads = 256;
constexpr int kPixelsPerThread = 4;  // channels_last fast path: output pixels along W per thread
constexpr int kRowsPerThread = 4;    // NCHW fast path: output rows per thread
constexpr int kMaxTileThreads = 256;
constexpr int kMaxTileColumns = 32;
constexpr int64_t kMaxTileSmemBytes = 48 * 1024;

struct DwconvParams {
  const void* x;
  void* y;
  const float* weight;  // [C, kh, kw]
  const float* bias;    // [C]
  int N, C, H, W, OH, OW;
  int KH, KW, SH, SW, PH, PW, DH, DW;
  Activation activation;
  // channels_last: threads in the grid (one per work item).
  int64_t items;
  // NCHW tiles: tile_x output columns x tile_y row runs per plane, `planes` planes per block.
  int tile_x, tile_y, planes, tiles_w, tiles_h, in_tile_h, in_tile_w;
};

// ------------------------------------------------------------------------------------- channels_last kernels
template <class T, int K, int S>
MBK_HOST_DEVICE void dwconv_cl_fast_thread(const DwconvParams& p, int64_t block, int thread) {
  constexpr int VEC = kVec16<T>;
  constexpr int PIX = kPixelsPerThread;
  constexpr int COLUMNS = (PIX - 1) * S + K;  // input columns feeding PIX consecutive output pixels
  const int64_t item = block * kChannelsLastThreads + thread;
  if (item >= p.items) return;
  const int vectors = p.C / VEC;
  const int runs = ceil_div(p.OW, PIX);
  const int64_t row = item / (int64_t(runs) * vectors);  // n * OH + oh
  const int in_row = static_cast<int>(item - row * runs * vectors);
  const int run = in_row / vectors;
  const int c0 = (in_row - run * vectors) * VEC;
  const int oh = static_cast<int>(row % p.OH);
  const int64_t n = row / p.OH;
  const int ow0 = run * PIX;
  const int ih0 = oh * S - p.PH;
  const int iw0 = ow0 * S - p.PW;

  float acc[PIX][VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const float b = load_ro(p.bias + c0 + v);
#pragma unroll
    for (int q = 0; q < PIX; ++q) acc[q][v] = b;
  }
  const T* x = static_cast<const T*>(p.x) + n * p.H * p.W * p.C + c0;
#pragma unroll
  for (int kh = 0; kh < K; ++kh) {
    const int ih = ih0 + kh;
    if (ih < 0 || ih >= p.H) continue;
    float w[K][VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v)
#pragma unroll
      for (int kw = 0; kw < K; ++kw) w[kw][v] = load_ro(p.weight + ((c0 + v) * K + kh) * K + kw);
    const T* x_row = x + int64_t(ih) * p.W * p.C;
#pragma unroll
    for (int j = 0; j < COLUMNS; ++j) {
      const int iw = iw0 + j;
      if (iw < 0 || iw >= p.W) continue;
      float xv[VEC];
      load_floats<T, VEC>(x_row + int64_t(iw) * p.C, xv);
#pragma unroll
      for (int q = 0; q < PIX; ++q) {
        const int kw = j - q * S;
        if (kw < 0 || kw >= K) continue;
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[q][v] = fmaf(w[kw][v], xv[v], acc[q][v]);
      }
    }
  }
  T* y = static_cast<T*>(p.y) + (row * p.OW + ow0) * p.C + c0;
#pragma unroll
  for (int q = 0; q < PIX; ++q) {
    if (ow0 + q >= p.OW) break;
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[q][v] = apply_activation(acc[q][v], p.activation);
    store_floats<T, VEC>(y + int64_t(q) * p.C, acc[q]);
  }
}

template <class T, int VEC>
MBK_HOST_DEVICE void dwconv_cl_generic_thread(const DwconvParams& p, int64_t block, int thread) {
  const int64_t item = block * kChannelsLastThreads + thread;
  if (item >= p.items) return;
  const int vectors = p.C / VEC;
  const int64_t pixel = item / vectors;  // (n * OH + oh) * OW + ow
  const int c0 = static_cast<int>(item - pixel * vectors) * VEC;
  const int64_t row = pixel / p.OW;
  const int ow = static_cast<int>(pixel - row * p.OW);
  const int oh = static_cast<int>(row % p.OH);
  const int64_t n = row / p.OH;

  float acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = load_ro(p.bias + c0 + v);
  const T* x = static_cast<const T*>(p.x) + n * p.H * p.W * p.C + c0;
  const int taps = p.KH * p.KW;
  for (int kh = 0; kh < p.KH; ++kh) {
    const int ih = oh * p.SH - p.PH + kh * p.DH;
    if (ih < 0 || ih >= p.H) continue;
    for (int kw = 0; kw < p.KW; ++kw) {
      const int iw = ow * p.SW - p.PW + kw * p.DW;
      if (iw < 0 || iw >= p.W) continue;
      float xv[VEC];
      load_floats<T, VEC>(x + (int64_t(ih) * p.W + iw) * p.C, xv);
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        acc[v] = fmaf(load_ro(p.weight + (c0 + v) * taps + kh * p.KW + kw), xv[v], acc[v]);
    }
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = apply_activation(acc[v], p.activation);
  store_floats<T, VEC>(static_cast<T*>(p.y) + pixel * p.C + c0, acc);
}

template <class T, int K, int S>
__global__ void __launch_bounds__(kChannelsLastThreads) dwconv_cl_fast_kernel(const DwconvParams p) {
  dwconv_cl_fast_thread<T, K, S>(p, blockIdx.x, threadIdx.x);
}

template <class T, int VEC>
__global__ void __launch_bounds__(kChannelsLastThreads) dwconv_cl_generic_kernel(const DwconvParams p) {
  dwconv_cl_generic_thread<T, VEC>(p, blockIdx.x, threadIdx.x);
}

// --------------------------------------------------------------------------------------------- NCHW kernels
struct TileOrigin {
  int64_t plane0;  // first (n * C + c) plane of the block
  int oh0, ow0;    // first output row / column of the tile
};

MBK_HOST_DEVICE TileOrigin tile_origin(const DwconvParams& p, int64_t block, int rows_per_thread) {
  const int tw = static_cast<int>(block % p.tiles_w);
  const int64_t rest = block / p.tiles_w;
  const int th = static_cast<int>(rest % p.tiles_h);
  return {rest / p.tiles_h * p.planes, th * p.tile_y * rows_per_thread, tw * p.tile_x};
}

// Phase 1: the block's input tiles (halo included, zeros outside the plane) into smem[plane][row][column].
template <class T>
MBK_HOST_DEVICE void dwconv_nchw_stage_thread(const DwconvParams& p, int64_t block, int thread, int threads, float* smem,
                                     int rows_per_thread) {
  const TileOrigin origin = tile_origin(p, block, rows_per_thread);
  const int columns = p.in_tile_w;
  // Threads cover `column_threads` columns of `row_step` rows at a time; rows advance without divisions.
  const int column_threads = columns < threads ? columns : threads;
  const int row_step = threads / column_threads;
  if (thread >= row_step * column_threads) return;
  const int ih0 = origin.oh0 * p.SH - p.PH;
  const int iw0 = origin.ow0 * p.SW - p.PW;
  const int64_t planes_total = int64_t(p.N) * p.C;
  const T* x = static_cast<const T*>(p.x);
  int plane = 0;
  int r = thread / column_threads;
  while (r >= p.in_tile_h) {
    r -= p.in_tile_h;
    ++plane;
  }
  for (; plane < p.planes;) {
    const int64_t global_plane = origin.plane0 + plane;
    const int ih = ih0 + r;
    const bool row_inside = global_plane < planes_total && ih >= 0 && ih < p.H;
    const T* x_row = x + (global_plane * p.H + ih) * p.W;
    float* s_row = smem + (plane * p.in_tile_h + r) * columns;
    for (int c = thread % column_threads; c < columns; c += column_threads) {
      const int iw = iw0 + c;
      s_row[c] = row_inside && iw >= 0 && iw < p.W ? to_float(x_row[iw]) : 0.f;
    }
    r += row_step;
    while (r >= p.in_tile_h) {
      r -= p.in_tile_h;
      ++plane;
    }
  }
}

struct TileThread {
  int64_t plane;  // global (n * C + c) plane, or -1 when the thread has no output
  int c, oh0, ow, tx, ty;
  int tile_plane;  // the plane's index in the block's shared memory
};

MBK_HOST_DEVICE TileThread tile_thread(const DwconvParams& p, int64_t block, int thread, int rows_per_thread) {
  const TileOrigin origin = tile_origin(p, block, rows_per_thread);
  const int tx = thread % p.tile_x;
  const int ty = thread / p.tile_x % p.tile_y;
  const int tile_plane = thread / (p.tile_x * p.tile_y);
  TileThread t{-1, 0, origin.oh0 + ty * rows_per_thread, origin.ow0 + tx, tx, ty, tile_plane};
  const int64_t plane = origin.plane0 + tile_plane;
  if (tile_plane < p.planes && plane < int64_t(p.N) * p.C && t.ow < p.OW && t.oh0 < p.OH) {
    t.plane = plane;
    t.c = static_cast<int>(plane % p.C);
  }
  return t;
}

// Phase 2, fast path: kRowsPerThread output rows of one column from the staged tile.
template <class T, int K, int S>
MBK_HOST_DEVICE void dwconv_nchw_fast_compute_thread(const DwconvParams& p, int64_t block, int thread, const float* smem) {
  constexpr int ROWS = kRowsPerThread;
  constexpr int IN_ROWS = (ROWS - 1) * S + K;
  const TileThread t = tile_thread(p, block, thread, ROWS);
  if (t.plane < 0) return;
  float w[K][K];
#pragma unroll
  for (int kh = 0; kh < K; ++kh)
#pragma unroll
    for (int kw = 0; kw < K; ++kw) w[kh][kw] = load_ro(p.weight + (t.c * K + kh) * K + kw);
  const float b = load_ro(p.bias + t.c);
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
  T* y = static_cast<T*>(p.y) + (t.plane * p.OH + t.oh0) * p.OW + t.ow;
#pragma unroll
  for (int q = 0; q < ROWS; ++q) {
    if (t.oh0 + q >= p.OH) break;
    y[int64_t(q) * p.OW] = from_float<T>(apply_activation(acc[q], p.activation));
  }
}

// Phase 2, generic path: one output element from the staged tile.
template <class T>
MBK_HOST_DEVICE void dwconv_nchw_generic_compute_thread(const DwconvParams& p, int64_t block, int thread, const float* smem) {
  const TileThread t = tile_thread(p, block, thread, 1);
  if (t.plane < 0) return;
  const float* s = smem + (t.tile_plane * p.in_tile_h + t.ty * p.SH) * p.in_tile_w + t.tx * p.SW;
  const float* w = p.weight + int64_t(t.c) * p.KH * p.KW;
  float acc = load_ro(p.bias + t.c);
  for (int kh = 0; kh < p.KH; ++kh)
    for (int kw = 0; kw < p.KW; ++kw)
      acc = fmaf(load_ro(w + kh * p.KW + kw), s[kh * p.DH * p.in_tile_w + kw * p.DW], acc);
  static_cast<T*>(p.y)[(t.plane * p.OH + t.oh0) * p.OW + t.ow] = from_float<T>(apply_activation(acc, p.activation));
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

// ------------------------------------------------------------------------------------------------- launcher
struct NchwPlan {
  int64_t blocks;
  int threads;
  int64_t smem_floats;
};

// Tiles: output columns split evenly into runs of <= 32, row runs so a plane's tile has <= 256 threads, and
// whole small planes packed several per block (keeping >= 256 blocks when there are that many planes).
NchwPlan plan_nchw_tiles(DwconvParams& p, int rows_per_thread) {
  const int64_t planes_total = int64_t(p.N) * p.C;
  int tiles_w = ceil_div(p.OW, kMaxTileColumns);
  p.tile_x = ceil_div(p.OW, tiles_w);
  const int row_runs = ceil_div(p.OH, rows_per_thread);
  int max_tile_y = std::max(1, kMaxTileThreads / p.tile_x);
  p.tiles_h = ceil_div(row_runs, max_tile_y);
  p.tile_y = ceil_div(row_runs, p.tiles_h);
  int64_t planes = 1;
  if (tiles_w == 1 && p.tiles_h == 1)
    planes = std::min<int64_t>(kMaxTileThreads / (p.tile_x * p.tile_y), std::max<int64_t>(1, planes_total / 256));
  auto in_rows = [&] { return (p.tile_y * rows_per_thread - 1) * p.SH + (p.KH - 1) * p.DH + 1; };
  auto in_cols = [&] { return (p.tile_x - 1) * p.SW + (p.KW - 1) * p.DW + 1; };
  auto smem_bytes = [&] { return planes * in_rows() * in_cols() * int64_t(sizeof(float)); };
  // Large kernels or dilations: shrink the tile until its halo fits.
  while (smem_bytes() > kMaxTileSmemBytes) {
    if (planes > 1) {
      planes = (planes + 1) / 2;
    } else if (p.tile_y > 1) {
      p.tile_y = (p.tile_y + 1) / 2;
      p.tiles_h = ceil_div(row_runs, p.tile_y);
    } else if (p.tile_x > 1) {
      p.tile_x = (p.tile_x + 1) / 2;
      tiles_w = ceil_div(p.OW, p.tile_x);
    } else {
      TORCH_CHECK(false, "dwconv_bn_act: kernel ", p.KH, "x", p.KW, " with dilation ", p.DH, "x", p.DW,
                  " needs more shared memory than one block has for the NCHW layout; use channels_last");
    }
  }
  p.planes = static_cast<int>(planes);
  p.tiles_w = tiles_w;
  p.in_tile_h = in_rows();
  p.in_tile_w = in_cols();
  const int64_t blocks = ceil_div<int64_t>(planes_total, planes) * p.tiles_h * p.tiles_w;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "dwconv_bn_act: x is too large (", blocks, " blocks)");
  return {blocks, p.tile_x * p.tile_y * p.planes, planes * p.in_tile_h * p.in_tile_w};
}

template <class T, int K, int S>
void run_nchw_fast(DwconvParams& p, const Executor& ex) {
  const NchwPlan plan = plan_nchw_tiles(p, kRowsPerThread);
  if (ex.on_device) {
    dwconv_nchw_fast_kernel<T, K, S><<<plan.blocks, plan.threads, plan.smem_floats * sizeof(float), ex.stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  emulate_grid(plan.blocks, plan.smem_floats, [&](int64_t block, float* smem) {
    emulate_phase(plan.threads, [&](int t) {
      dwconv_nchw_stage_thread<T>(p, block, t, plan.threads, smem, kRowsPerThread);
    });
    emulate_phase(plan.threads, [&](int t) { dwconv_nchw_fast_compute_thread<T, K, S>(p, block, t, smem); });
  });
}

template <class T>
void run_nchw_generic(DwconvParams& p, const Executor& ex) {
  const NchwPlan plan = plan_nchw_tiles(p, 1);
  if (ex.on_device) {
    dwconv_nchw_generic_kernel<T><<<plan.blocks, plan.threads, plan.smem_floats * sizeof(float), ex.stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  emulate_grid(plan.blocks, plan.smem_floats, [&](int64_t block, float* smem) {
    emulate_phase(plan.threads, [&](int t) { dwconv_nchw_stage_thread<T>(p, block, t, plan.threads, smem, 1); });
    emulate_phase(plan.threads, [&](int t) { dwconv_nchw_generic_compute_thread<T>(p, block, t, smem); });
  });
}

template <class T, int K, int S>
void run_cl_fast(DwconvParams& p, const Executor& ex) {
  p.items = int64_t(p.N) * p.OH * ceil_div(p.OW, kPixelsPerThread) * (p.C / kVec16<T>);
  const int64_t blocks = ceil_div<int64_t>(p.items, kChannelsLastThreads);
  if (ex.on_device) {
    dwconv_cl_fast_kernel<T, K, S><<<blocks, kChannelsLastThreads, 0, ex.stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  emulate_grid(blocks, 0, [&](int64_t block, float*) {
    emulate_phase(kChannelsLastThreads, [&](int t) { dwconv_cl_fast_thread<T, K, S>(p, block, t); });
  });
}

template <class T, int VEC>
void run_cl_generic(DwconvParams& p, const Executor& ex) {
  p.items = int64_t(p.N) * p.OH * p.OW * (p.C / VEC);
  const int64_t blocks = ceil_div<int64_t>(p.items, kChannelsLastThreads);
  if (ex.on_device) {
    dwconv_cl_generic_kernel<T, VEC><<<blocks, kChannelsLastThreads, 0, ex.stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  emulate_grid(blocks, 0, [&](int64_t block, float*) {
    emulate_phase(kChannelsLastThreads, [&](int t) { dwconv_cl_generic_thread<T, VEC>(p, block, t); });
  });
}

// Calls run<K, S>() for a fast-path shape and returns true, else returns false.
template <class Run>
bool with_fast_shape(const DwconvParams& p, Run&& run) {
  if (p.KH != p.KW || p.SH != p.SW || p.DH != 1 || p.DW != 1) return false;
  const int key = p.KH * 10 + p.SH;
  switch (key) {
    case 31: run(std::integral_constant<int, 3>{}, std::integral_constant<int, 1>{}); return true;
    case 32: run(std::integral_constant<int, 3>{}, std::integral_constant<int, 2>{}); return true;
    case 51: run(std::integral_constant<int, 5>{}, std::integral_constant<int, 1>{}); return true;
    case 52: run(std::integral_constant<int, 5>{}, std::integral_constant<int, 2>{}); return true;
    case 71: run(std::integral_constant<int, 7>{}, std::integral_constant<int, 1>{}); return true;
    case 72: run(std::integral_constant<int, 7>{}, std::integral_constant<int, 2>{}); return true;
    default: return false;
  }
}

bool is_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

at::Tensor dwconv_bn_act_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              c10::string_view activation, bool on_device) {
  const char* where = on_device ? "a CUDA tensor" : "a CPU tensor (the host emulation of the CUDA kernel)";
  TORCH_CHECK(on_device ? x.is_cuda() : x.is_cpu(), "dwconv_bn_act_cuda: x must be ", where, ", got ", x.device());
  TORCH_CHECK(x.dim() == 4, "dwconv_bn_act_cuda: x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "dwconv_bn_act_cuda: x must be contiguous (NCHW or channels_last), got strides ", x.strides());
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1,
              "dwconv_bn_act_cuda: weight must be [C, 1, kh, kw] with C = ", C, ", got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, "dwconv_bn_act_cuda: bias must be [", C, "], got ",
              bias.sizes());
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "dwconv_bn_act_cuda: ", name, " must be float32, got ",
                t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), "dwconv_bn_act_cuda: ", name, " must be contiguous");
    TORCH_CHECK(t->device() == x.device(), "dwconv_bn_act_cuda: ", name, " is on ", t->device(), " but x is on ",
                x.device());
  }
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1,
              "dwconv_bn_act_cuda: stride must be two ints >= 1, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
              "dwconv_bn_act_cuda: padding must be two ints >= 0, got ", padding);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1,
              "dwconv_bn_act_cuda: dilation must be two ints >= 1, got ", dilation);
  const int act = activation_index(activation);
  TORCH_CHECK(act >= 0, "dwconv_bn_act_cuda: unknown activation '", activation, "'");
  const int64_t kh = weight.size(2), kw = weight.size(3);
  const int64_t out_h = (x.size(2) + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t out_w = (x.size(3) + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(kh >= 1 && kw >= 1 && out_h >= 1 && out_w >= 1, "dwconv_bn_act_cuda: kernel ", kh, "x", kw,
              " with dilation ", dilation, " does not fit x's ", x.size(2), "x", x.size(3), " plane padded by ",
              padding);
  // Offsets within a plane, a row, or the weights are 32-bit; offsets across planes and samples are 64-bit.
  constexpr int64_t kInt32 = int64_t(1) << 31;
  TORCH_CHECK(x.size(2) * x.size(3) * C < kInt32 && out_h * out_w * C < kInt32 && C * kh * kw < kInt32 &&
                  x.size(0) * C < kInt32 && padding[0] < kInt32 / 4 && padding[1] < kInt32 / 4 &&
                  stride[0] * out_h < kInt32 && stride[1] * out_w < kInt32,
              "dwconv_bn_act_cuda: one sample of x is too large (", x.sizes(), ")");

  const bool channels_last = is_channels_last(x);
  at::Tensor y = at::empty({x.size(0), C, out_h, out_w},
                           x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                   : at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;

  DwconvParams p{};
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.weight = weight.data_ptr<float>();
  p.bias = bias.data_ptr<float>();
  p.N = static_cast<int>(x.size(0));
  p.C = static_cast<int>(C);
  p.H = static_cast<int>(x.size(2));
  p.W = static_cast<int>(x.size(3));
  p.OH = static_cast<int>(out_h);
  p.OW = static_cast<int>(out_w);
  p.KH = static_cast<int>(kh);
  p.KW = static_cast<int>(kw);
  p.SH = static_cast<int>(stride[0]);
  p.SW = static_cast<int>(stride[1]);
  p.PH = static_cast<int>(padding[0]);
  p.PW = static_cast<int>(padding[1]);
  p.DH = static_cast<int>(dilation[0]);
  p.DW = static_cast<int>(dilation[1]);
  p.activation = static_cast<Activation>(act);

  std::optional<c10::cuda::CUDAGuard> guard;
  Executor ex{on_device, nullptr};
  if (on_device) {
    guard.emplace(x.device());
    ex.stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  }
  dispatch_float_types(x.scalar_type(), "dwconv_bn_act_cuda: x", [&](auto tag) {
    using T = decltype(tag);
    if (channels_last) {
      const bool vectorized = p.C % kVec16<T> == 0 && aligned16(p.x) && aligned16(p.y);
      if (vectorized && with_fast_shape(p, [&](auto k, auto s) { run_cl_fast<T, decltype(k)::value, decltype(s)::value>(p, ex); })) return;
      if (vectorized)
        run_cl_generic<T, kVec16<T>>(p, ex);
      else
        run_cl_generic<T, 1>(p, ex);
    } else {
      if (!with_fast_shape(p, [&](auto k, auto s) { run_nchw_fast<T, decltype(k)::value, decltype(s)::value>(p, ex); })) run_nchw_generic<T>(p, ex);
    }
  });
  return y;
}

}  // namespace

at::Tensor dwconv_bn_act_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              c10::string_view activation) {
  return dwconv_bn_act_impl(x, weight, bias, stride, padding, dilation, activation, true);
}

at::Tensor dwconv_bn_act_emulated(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  c10::string_view activation) {
  return dwconv_bn_act_impl(x, weight, bias, stride, padding, dilation, activation, false);
}

}  // namespace mbkernels
