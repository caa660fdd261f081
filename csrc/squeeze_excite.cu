// Squeeze-excite: y = x * gate(w_expand @ act(w_reduce @ mean_hw(x) + b_reduce) + b_expand), in 3 launches that
// read x twice and write y once (the floor for an op whose output depends on a reduction of its whole input).
//
// 1. pool: float32 partial sums of each (n, c) plane over `splits` chunks of the plane -> partial[n][split][c].
//    No atomics: each block writes its own slots, and the sums (per thread in index order, then a shared-memory
//    tree of fixed shape, then over the splits in order in step 2) are the same bits on every run.
//    - NCHW <T, VEC>: `groups` planes per 256-thread block, `group_threads` (a power of two) threads per plane,
//      each summing a strided run of VEC-element vectors of its chunk. Small planes (7x7) pack many per block;
//      big planes with few channels (112x112, C=16) split over several blocks.
//    - channels_last <T, VEC>: threads along channel vectors (channel_threads) x rows (row_threads, a power of
//      two), each summing rows of its chunk for its vector of channels; reduced over the rows in shared memory.
// 2. mlp: one 512-thread block per sample computes the whole MLP once: pooled means into shared memory, then
//    two matrix-vector products. In each, `lanes` threads share one output row (a warp reads a row contiguously),
//    write their partial dot products to shared memory, and after a barrier one thread per row adds its lanes in
//    order and applies the bias and activation (act for the hidden layer, gate for the scale[n][c] it writes).
// 3. scale <T, VEC>: y = x * scale[n][c], 4 vectors per thread.
// VEC is 16 bytes (8 half/bfloat16, 4 float) where the vectors line up with the planes (NCHW: H*W a multiple of
// VEC) or with the channels (channels_last: C a multiple of VEC) and the pointers are aligned, else 1.
//
// Emulation (kernel_utils.cuh): every kernel is a sequence of __host__ __device__ phase functions of (params,
// block, thread, shared memory) separated by __syncthreads() on the GPU; squeeze_excite_emulated runs the same
// plan and phases on CPU tensors, each phase for all threads of a block before the next.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "activations.cuh"
#include "kernel_utils.cuh"
#include "ops.h"

#include <optional>

namespace mbkernels {
namespace {

constexpr int kPoolThreads = 256;
constexpr int kMlpThreads = 512;
constexpr int kScaleThreads = 256;
constexpr int kScaleVectorsPerThread = 4;
constexpr int64_t kPoolTargetBlocks = 1024;  // enough blocks to fill an H100/H200 several times over
constexpr int kMinPoolLoadsPerThread = 4;
constexpr int64_t kDefaultSmemBytes = 48 * 1024;

struct SeParams {
  const void* x;
  void* y;
  float* partial;  // [N, splits, C]
  float* scale;    // [N, C]
  const float* w_reduce;  // [R, C]
  const float* b_reduce;  // [R] or null
  const float* w_expand;  // [C, R]
  const float* b_expand;  // [C] or null
  int N, C, HW, R;
  Activation activation;
  Gate gate;
  // pool
  int splits;         // chunks per plane
  int chunk;          // NCHW: vectors per chunk; channels_last: rows per chunk
  int group_threads;  // NCHW: threads per plane (power of two); channels_last: threads along channel vectors
  int groups;         // NCHW: planes per block; channels_last: threads along rows (power of two)
  int channel_blocks; // channels_last: blocks along the channel vectors
  // mlp
  int reduce_lanes, expand_lanes;
  // scale
  int64_t vectors;
};

// --------------------------------------------------------------------------------------------------- pool
template <class T, int VEC>
MBK_HOST_DEVICE void pool_nchw_sum_thread(const SeParams& p, int64_t block, int thread, float* smem) {
  const int split = static_cast<int>(block % p.splits);
  const int64_t plane = block / p.splits * p.groups + thread / p.group_threads;
  const int lane = thread % p.group_threads;
  float acc = 0.f;
  if (plane < int64_t(p.N) * p.C) {
    const T* x = static_cast<const T*>(p.x) + plane * p.HW;
    const int begin = split * p.chunk;
    const int end = min_int(begin + p.chunk, p.HW / VEC);
    for (int v = begin + lane; v < end; v += p.group_threads) {
      float xv[VEC];
      load_floats<T, VEC>(x + int64_t(v) * VEC, xv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc += xv[i];
    }
  }
  smem[thread] = acc;
}

// One step of the tree over each plane's group_threads slots.
MBK_HOST_DEVICE void pool_nchw_tree_thread(const SeParams& p, int thread, int stride, float* smem) {
  if (thread % p.group_threads < stride) smem[thread] += smem[thread + stride];
}

MBK_HOST_DEVICE void pool_nchw_store_thread(const SeParams& p, int64_t block, int thread, const float* smem) {
  const int64_t plane = block / p.splits * p.groups + thread / p.group_threads;
  if (thread % p.group_threads != 0 || plane >= int64_t(p.N) * p.C) return;
  const int64_t n = plane / p.C;
  const int c = static_cast<int>(plane - n * p.C);
  p.partial[(n * p.splits + block % p.splits) * p.C + c] = smem[thread];
}

struct ClPoolThread {
  int64_t n;
  int split, vector, row_thread, channel_thread;
};

MBK_HOST_DEVICE ClPoolThread cl_pool_thread(const SeParams& p, int64_t block, int thread) {
  const int split = static_cast<int>(block % p.splits);
  const int64_t rest = block / p.splits;
  const int channel_block = static_cast<int>(rest % p.channel_blocks);
  const int channel_thread = thread % p.group_threads;
  return {rest / p.channel_blocks, split, channel_block * p.group_threads + channel_thread, thread / p.group_threads,
          channel_thread};
}

// smem[VEC][row_threads][channel_threads]: consecutive threads touch consecutive words.
template <class T, int VEC>
MBK_HOST_DEVICE void pool_cl_sum_thread(const SeParams& p, int64_t block, int thread, float* smem) {
  const ClPoolThread t = cl_pool_thread(p, block, thread);
  if (t.row_thread >= p.groups) return;
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
  if (t.vector < p.C / VEC) {
    const T* x = static_cast<const T*>(p.x) + t.n * p.HW * p.C + t.vector * VEC;
    const int begin = t.split * p.chunk;
    const int end = min_int(begin + p.chunk, p.HW);
    for (int r = begin + t.row_thread; r < end; r += p.groups) {
      float xv[VEC];
      load_floats<T, VEC>(x + int64_t(r) * p.C, xv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += xv[i];
    }
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) smem[(i * p.groups + t.row_thread) * p.group_threads + t.channel_thread] = acc[i];
}

template <int VEC>
MBK_HOST_DEVICE void pool_cl_tree_thread(const SeParams& p, int thread, int stride, float* smem) {
  const int row_thread = thread / p.group_threads;
  if (row_thread >= stride) return;
  const int channel_thread = thread % p.group_threads;
#pragma unroll
  for (int i = 0; i < VEC; ++i)
    smem[(i * p.groups + row_thread) * p.group_threads + channel_thread] +=
        smem[(i * p.groups + row_thread + stride) * p.group_threads + channel_thread];
}

template <int VEC>
MBK_HOST_DEVICE void pool_cl_store_thread(const SeParams& p, int64_t block, int thread, const float* smem) {
  const ClPoolThread t = cl_pool_thread(p, block, thread);
  if (t.row_thread != 0 || t.vector >= p.C / VEC) return;
  float* out = p.partial + (t.n * p.splits + t.split) * p.C + t.vector * VEC;
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = smem[i * p.groups * p.group_threads + t.channel_thread];
}

template <class T, int VEC>
__global__ void __launch_bounds__(kPoolThreads) pool_nchw_kernel(const SeParams p) {
  __shared__ float smem[kPoolThreads];
  pool_nchw_sum_thread<T, VEC>(p, blockIdx.x, threadIdx.x, smem);
  for (int stride = p.group_threads / 2; stride > 0; stride /= 2) {
    __syncthreads();
    pool_nchw_tree_thread(p, threadIdx.x, stride, smem);
  }
  __syncthreads();
  pool_nchw_store_thread(p, blockIdx.x, threadIdx.x, smem);
}

template <class T, int VEC>
__global__ void __launch_bounds__(kPoolThreads) pool_cl_kernel(const SeParams p) {
  __shared__ float smem[kPoolThreads * VEC];
  pool_cl_sum_thread<T, VEC>(p, blockIdx.x, threadIdx.x, smem);
  for (int stride = p.groups / 2; stride > 0; stride /= 2) {
    __syncthreads();
    pool_cl_tree_thread<VEC>(p, threadIdx.x, stride, smem);
  }
  __syncthreads();
  pool_cl_store_thread<VEC>(p, blockIdx.x, threadIdx.x, smem);
}

// ---------------------------------------------------------------------------------------------------- mlp
// Shared memory of the mlp block: pooled[C], hidden[R], then the partial dot products [rows][lanes + 1].
struct MlpSmem {
  float* pooled;
  float* hidden;
  float* partial;
};

MBK_HOST_DEVICE MlpSmem mlp_smem(const SeParams& p, float* smem) { return {smem, smem + p.C, smem + p.C + p.R}; }

MBK_HOST_DEVICE void mlp_pool_thread(const SeParams& p, int64_t n, int thread, float* smem) {
  const MlpSmem s = mlp_smem(p, smem);
  for (int c = thread; c < p.C; c += kMlpThreads) {
    float sum = 0.f;
    for (int split = 0; split < p.splits; ++split) sum += p.partial[(n * p.splits + split) * p.C + c];
    s.pooled[c] = sum / static_cast<float>(p.HW);
  }
}

// `lanes` threads per row of m [rows, cols]: partial[row][lane] = sum over cols = lane (mod lanes).
MBK_HOST_DEVICE void matvec_partial_thread(const float* m, const float* v, int rows, int cols, int lanes, float* partial,
                                  int thread) {
  const int lane = thread % lanes;
  for (int row = thread / lanes; row < rows; row += kMlpThreads / lanes) {
    const float* m_row = m + int64_t(row) * cols;
    float acc = 0.f;
    for (int col = lane; col < cols; col += lanes) acc = fmaf(load_ro(m_row + col), v[col], acc);
    partial[row * (lanes + 1) + lane] = acc;
  }
}

MBK_HOST_DEVICE float matvec_row(const float* partial, int row, int lanes) {
  float sum = 0.f;
  for (int lane = 0; lane < lanes; ++lane) sum += partial[row * (lanes + 1) + lane];
  return sum;
}

MBK_HOST_DEVICE void mlp_reduce_thread(const SeParams& p, int thread, float* smem) {
  const MlpSmem s = mlp_smem(p, smem);
  matvec_partial_thread(p.w_reduce, s.pooled, p.R, p.C, p.reduce_lanes, s.partial, thread);
}

MBK_HOST_DEVICE void mlp_hidden_thread(const SeParams& p, int thread, float* smem) {
  const MlpSmem s = mlp_smem(p, smem);
  for (int r = thread; r < p.R; r += kMlpThreads) {
    const float bias = p.b_reduce ? load_ro(p.b_reduce + r) : 0.f;
    s.hidden[r] = apply_activation(matvec_row(s.partial, r, p.reduce_lanes) + bias, p.activation);
  }
}

MBK_HOST_DEVICE void mlp_expand_thread(const SeParams& p, int thread, float* smem) {
  const MlpSmem s = mlp_smem(p, smem);
  matvec_partial_thread(p.w_expand, s.hidden, p.C, p.R, p.expand_lanes, s.partial, thread);
}

MBK_HOST_DEVICE void mlp_gate_thread(const SeParams& p, int64_t n, int thread, float* smem) {
  const MlpSmem s = mlp_smem(p, smem);
  for (int c = thread; c < p.C; c += kMlpThreads) {
    const float bias = p.b_expand ? load_ro(p.b_expand + c) : 0.f;
    p.scale[n * p.C + c] = apply_gate(matvec_row(s.partial, c, p.expand_lanes) + bias, p.gate);
  }
}

__global__ void __launch_bounds__(kMlpThreads) mlp_kernel(const SeParams p) {
  extern __shared__ float smem[];
  mlp_pool_thread(p, blockIdx.x, threadIdx.x, smem);
  __syncthreads();
  mlp_reduce_thread(p, threadIdx.x, smem);
  __syncthreads();
  mlp_hidden_thread(p, threadIdx.x, smem);
  __syncthreads();
  mlp_expand_thread(p, threadIdx.x, smem);
  __syncthreads();
  mlp_gate_thread(p, blockIdx.x, threadIdx.x, smem);
}

// -------------------------------------------------------------------------------------------------- scale
template <class T, int VEC, bool CHANNELS_LAST>
MBK_HOST_DEVICE void scale_thread(const SeParams& p, int64_t block, int thread) {
#pragma unroll
  for (int k = 0; k < kScaleVectorsPerThread; ++k) {
    const int64_t vector = (block * kScaleVectorsPerThread + k) * kScaleThreads + thread;
    if (vector >= p.vectors) return;
    const int64_t e = vector * VEC;
    float s[VEC];
    if (CHANNELS_LAST) {
      const int64_t pixel = e / p.C;  // n * HW + hw
      const int c = static_cast<int>(e - pixel * p.C);
      const float* scale = p.scale + pixel / p.HW * p.C + c;
#pragma unroll
      for (int i = 0; i < VEC; ++i) s[i] = scale[i];
    } else {
      const float plane_scale = p.scale[e / p.HW];  // VEC divides HW: a vector lies in one plane
#pragma unroll
      for (int i = 0; i < VEC; ++i) s[i] = plane_scale;
    }
    float xv[VEC];
    load_floats<T, VEC>(static_cast<const T*>(p.x) + e, xv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) xv[i] *= s[i];
    store_floats<T, VEC>(static_cast<T*>(p.y) + e, xv);
  }
}

template <class T, int VEC, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kScaleThreads) scale_kernel(const SeParams p) {
  scale_thread<T, VEC, CHANNELS_LAST>(p, blockIdx.x, threadIdx.x);
}

// ------------------------------------------------------------------------------------------------ launcher
int pow2_floor(int v) {
  int p = 1;
  while (p * 2 <= v) p *= 2;
  return p;
}

int pow2_ceil(int v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

// Splits of a plane of `units` loads for `blocks` blocks of `threads_per_unit` threads each: enough blocks to fill
// the GPU, but at least kMinPoolLoadsPerThread loads per thread.
int pool_splits(int64_t blocks, int units, int threads_per_unit) {
  const int64_t most = std::max<int64_t>(1, units / (int64_t(threads_per_unit) * kMinPoolLoadsPerThread));
  const int64_t wanted = ceil_div<int64_t>(kPoolTargetBlocks, blocks);
  return static_cast<int>(std::max<int64_t>(1, std::min(most, wanted)));
}

// The pool's tiles and splits (params' pool fields); returns its number of blocks.
template <int VEC>
int64_t plan_pool(SeParams& p, bool channels_last) {
  int64_t blocks;
  if (channels_last) {
    const int vectors = p.C / VEC;
    p.group_threads = std::min(vectors, kPoolThreads);
    p.groups = pow2_floor(kPoolThreads / p.group_threads);
    p.channel_blocks = ceil_div(vectors, p.group_threads);
    p.splits = pool_splits(int64_t(p.N) * p.channel_blocks, p.HW, p.groups);
    p.chunk = ceil_div(p.HW, p.splits);
    p.splits = ceil_div(p.HW, p.chunk);
    blocks = int64_t(p.N) * p.channel_blocks * p.splits;
  } else {
    const int vectors = p.HW / VEC;
    p.group_threads = std::clamp(pow2_ceil(ceil_div(vectors, kMinPoolLoadsPerThread)), 32, kPoolThreads);
    p.groups = kPoolThreads / p.group_threads;
    const int64_t plane_blocks = ceil_div<int64_t>(int64_t(p.N) * p.C, p.groups);
    p.splits = pool_splits(plane_blocks, vectors, p.group_threads);
    p.chunk = ceil_div(vectors, p.splits);
    p.splits = ceil_div(vectors, p.chunk);
    blocks = plane_blocks * p.splits;
  }
  TORCH_CHECK(blocks < (int64_t(1) << 31), "squeeze_excite_cuda: x is too large (", blocks, " pool blocks)");
  return blocks;
}

template <class T, int VEC>
void run_pool(const SeParams& p, bool channels_last, int64_t blocks, const Executor& ex) {
  if (ex.on_device) {
    if (channels_last)
      pool_cl_kernel<T, VEC><<<blocks, kPoolThreads, 0, ex.stream>>>(p);
    else
      pool_nchw_kernel<T, VEC><<<blocks, kPoolThreads, 0, ex.stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int tree_width = channels_last ? p.groups : p.group_threads;
  emulate_grid(blocks, kPoolThreads * VEC, [&](int64_t block, float* smem) {
    emulate_phase(kPoolThreads, [&](int t) {
      if (channels_last)
        pool_cl_sum_thread<T, VEC>(p, block, t, smem);
      else
        pool_nchw_sum_thread<T, VEC>(p, block, t, smem);
    });
    for (int stride = tree_width / 2; stride > 0; stride /= 2)
      emulate_phase(kPoolThreads, [&](int t) {
        if (channels_last)
          pool_cl_tree_thread<VEC>(p, t, stride, smem);
        else
          pool_nchw_tree_thread(p, t, stride, smem);
      });
    emulate_phase(kPoolThreads, [&](int t) {
      if (channels_last)
        pool_cl_store_thread<VEC>(p, block, t, smem);
      else
        pool_nchw_store_thread(p, block, t, smem);
    });
  });
}

// Lanes per matrix row: up to a warp, about 8 columns per lane, halved while the partials do not fit.
int matvec_lanes(int rows, int cols, int64_t other_floats) {
  int lanes = std::min(32, pow2_floor(std::max(1, cols / 8)));
  while (lanes > 1 && (other_floats + int64_t(rows) * (lanes + 1)) * int64_t(sizeof(float)) > kDefaultSmemBytes)
    lanes /= 2;
  return lanes;
}

void run_mlp(SeParams& p, const Executor& ex) {
  p.reduce_lanes = matvec_lanes(p.R, p.C, p.C + p.R);
  p.expand_lanes = matvec_lanes(p.C, p.R, p.C + p.R);
  const int64_t smem_floats =
      p.C + p.R + std::max(int64_t(p.R) * (p.reduce_lanes + 1), int64_t(p.C) * (p.expand_lanes + 1));
  const int64_t smem_bytes = smem_floats * int64_t(sizeof(float));
  if (ex.on_device) {
    if (smem_bytes > kDefaultSmemBytes) {
      int device = 0, most = 0;
      C10_CUDA_CHECK(cudaGetDevice(&device));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
      TORCH_CHECK(smem_bytes <= most, "squeeze_excite_cuda: C = ", p.C, " and R = ", p.R, " need ", smem_bytes,
                  " bytes of shared memory; this GPU has ", most, " per block");
      C10_CUDA_CHECK(cudaFuncSetAttribute(mlp_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem_bytes)));
    }
    mlp_kernel<<<p.N, kMlpThreads, smem_bytes, ex.stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  emulate_grid(p.N, smem_floats, [&](int64_t n, float* smem) {
    emulate_phase(kMlpThreads, [&](int t) { mlp_pool_thread(p, n, t, smem); });
    emulate_phase(kMlpThreads, [&](int t) { mlp_reduce_thread(p, t, smem); });
    emulate_phase(kMlpThreads, [&](int t) { mlp_hidden_thread(p, t, smem); });
    emulate_phase(kMlpThreads, [&](int t) { mlp_expand_thread(p, t, smem); });
    emulate_phase(kMlpThreads, [&](int t) { mlp_gate_thread(p, n, t, smem); });
  });
}

template <class T, int VEC, bool CHANNELS_LAST>
void run_scale(SeParams& p, const Executor& ex) {
  p.vectors = int64_t(p.N) * p.C * p.HW / VEC;
  const int64_t blocks = ceil_div<int64_t>(p.vectors, kScaleThreads * kScaleVectorsPerThread);
  TORCH_CHECK(blocks < (int64_t(1) << 31), "squeeze_excite_cuda: x is too large (", blocks, " scale blocks)");
  if (ex.on_device) {
    scale_kernel<T, VEC, CHANNELS_LAST><<<blocks, kScaleThreads, 0, ex.stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  emulate_grid(blocks, 0, [&](int64_t block, float*) {
    emulate_phase(kScaleThreads, [&](int t) { scale_thread<T, VEC, CHANNELS_LAST>(p, block, t); });
  });
}

// Scratch (float32, one allocation): the pool's partial sums [N, splits, C], then the scale [N, C].
template <class T, int VEC>
void run_squeeze_excite(SeParams& p, bool channels_last, const at::Tensor& x, const Executor& ex) {
  const int64_t pool_blocks = plan_pool<VEC>(p, channels_last);
  const at::Tensor scratch = at::empty({int64_t(p.N) * p.C * (p.splits + 1)}, x.options().dtype(at::kFloat));
  p.partial = scratch.data_ptr<float>();
  p.scale = p.partial + int64_t(p.N) * p.splits * p.C;
  run_pool<T, VEC>(p, channels_last, pool_blocks, ex);
  run_mlp(p, ex);
  if (channels_last)
    run_scale<T, VEC, true>(p, ex);
  else
    run_scale<T, VEC, false>(p, ex);
}

void check_weight(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "squeeze_excite_cuda: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "squeeze_excite_cuda: ", name, " must be contiguous");
  TORCH_CHECK(t.device() == x.device(), "squeeze_excite_cuda: ", name, " is on ", t.device(), " but x is on ",
              x.device());
  if (cols < 0) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, "squeeze_excite_cuda: ", name, " must be [", rows, "], got ",
                t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "squeeze_excite_cuda: ", name,
                " must be [", rows, ", ", cols, "], got ", t.sizes());
  }
}

at::Tensor squeeze_excite_impl(const at::Tensor& x, const at::Tensor& w_reduce,
                               const std::optional<at::Tensor>& b_reduce, const at::Tensor& w_expand,
                               const std::optional<at::Tensor>& b_expand, c10::string_view activation,
                               c10::string_view gate, bool on_device) {
  const char* where = on_device ? "a CUDA tensor" : "a CPU tensor (the host emulation of the CUDA kernel)";
  TORCH_CHECK(on_device ? x.is_cuda() : x.is_cpu(), "squeeze_excite_cuda: x must be ", where, ", got ",
              x.device());
  TORCH_CHECK(x.dim() == 4, "squeeze_excite_cuda: x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "squeeze_excite_cuda: x must be contiguous (NCHW or channels_last), got strides ", x.strides());
  const int64_t C = x.size(1);
  TORCH_CHECK(w_reduce.dim() == 2 && w_reduce.size(0) >= 1,
              "squeeze_excite_cuda: w_reduce must be [R, C] with R >= 1, got ", w_reduce.sizes());
  const int64_t R = w_reduce.size(0);
  check_weight(w_reduce, "w_reduce", x, R, C);
  check_weight(w_expand, "w_expand", x, C, R);
  if (b_reduce) check_weight(*b_reduce, "b_reduce", x, R, -1);
  if (b_expand) check_weight(*b_expand, "b_expand", x, C, -1);
  const int act = activation_index(activation);
  TORCH_CHECK(act == static_cast<int>(Activation::ReLU) || act == static_cast<int>(Activation::SiLU),
              "squeeze_excite_cuda: unknown activation '", activation, "'; expected relu or silu");
  const int gate_code = gate_index(gate);
  TORCH_CHECK(gate_code >= 0, "squeeze_excite_cuda: unknown gate '", gate, "'; expected sigmoid or hardsigmoid");
  constexpr int64_t kInt32 = int64_t(1) << 31;
  const int64_t HW = x.size(2) * x.size(3);
  TORCH_CHECK(HW * C < kInt32 && C * R < kInt32 && x.size(0) * C < kInt32,
              "squeeze_excite_cuda: one sample of x or the weights are too large (x ", x.sizes(), ", R ", R, ")");

  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                             : at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;

  SeParams p{};
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.w_reduce = w_reduce.data_ptr<float>();
  p.b_reduce = b_reduce ? b_reduce->data_ptr<float>() : nullptr;
  p.w_expand = w_expand.data_ptr<float>();
  p.b_expand = b_expand ? b_expand->data_ptr<float>() : nullptr;
  p.N = static_cast<int>(x.size(0));
  p.C = static_cast<int>(C);
  p.HW = static_cast<int>(HW);
  p.R = static_cast<int>(R);
  p.activation = static_cast<Activation>(act);
  p.gate = static_cast<Gate>(gate_code);

  std::optional<c10::cuda::CUDAGuard> guard;
  Executor ex{on_device, nullptr};
  if (on_device) {
    guard.emplace(x.device());
    ex.stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  }
  dispatch_float_types(x.scalar_type(), "squeeze_excite_cuda: x", [&](auto tag) {
    using T = decltype(tag);
    constexpr int VEC = kVec16<T>;
    const bool vectorized =
        (channels_last ? p.C % VEC == 0 : p.HW % VEC == 0) && aligned16(p.x) && aligned16(p.y);
    if (vectorized)
      run_squeeze_excite<T, VEC>(p, channels_last, x, ex);
    else
      run_squeeze_excite<T, 1>(p, channels_last, x, ex);
  });
  return y;
}

}  // namespace

at::Tensor squeeze_excite_cuda(const at::Tensor& x, const at::Tensor& w_reduce,
                               const std::optional<at::Tensor>& b_reduce, const at::Tensor& w_expand,
                               const std::optional<at::Tensor>& b_expand, c10::string_view activation,
                               c10::string_view gate) {
  return squeeze_excite_impl(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate, true);
}

at::Tensor squeeze_excite_emulated(const at::Tensor& x, const at::Tensor& w_reduce,
                                   const std::optional<at::Tensor>& b_reduce, const at::Tensor& w_expand,
                                   const std::optional<at::Tensor>& b_expand, c10::string_view activation,
                                   c10::string_view gate) {
  return squeeze_excite_impl(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate, false);
}

}  // namespace mbkernels
