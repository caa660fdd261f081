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
// 2. mlp: two launches of one batched matrix-vector kernel, hidden = act(w_reduce @ mean + b_reduce) then
//    scale = gate(w_expand @ hidden + b_expand). A block computes a tile of rows for kMlpSamples samples, so each
//    weight is read once per tile of samples, not once per sample. Per chunk of the inputs: the samples' inputs
//    are staged in shared memory (the reduce layer sums the pool's splits there), then `row_threads` threads per
//    row walk the chunk in 16-byte weight vectors, several in flight, each feeding every sample. The lanes'
//    partial sums meet in shared memory and one thread per (row, sample) adds them in order. Few rows or samples
//    (batch 1) give each row more threads (split rows) so the grid still fills the GPU.
// 3. scale <T, VEC>: y = x * scale[n][c] in VEC-element vectors, the float32 scale loaded as vectors too; blocks
//    never straddle samples, so the in-sample offsets and the channel of a vector are 32-bit arithmetic.
// VEC is 16 bytes (8 half/bfloat16, 4 float) where the vectors line up with the planes (NCHW: H*W a multiple of
// VEC) or with the channels (channels_last: C a multiple of VEC) and the pointers are aligned, else 1.
//
// Emulation (kernel_utils.cuh): every kernel is a sequence of __host__ __device__ phase functions of (params,
// block, thread, shared memory) separated by __syncthreads() on the GPU; on CPU tensors the launcher runs the
// same plan and phases, each phase for all threads of a block before the next. The mlp's accumulators live
// across barriers: they are a per-thread state (registers on the GPU, kept per thread by the emulation).
#include "activations.cuh"
#include "kernel_utils.cuh"
#include "ops.h"

#include <string>

namespace mbkernels {
namespace {

constexpr int kPoolThreads = 256;
constexpr int kMlpThreads = 256;
constexpr int kMlpSamples = 8;     // samples per mlp block: each weight tile is read once for all of them
constexpr int kMlpChunk = 512;     // inputs per sample staged in shared memory at a time
constexpr int kScaleThreads = 256;
constexpr int kScaleVectorsPerThread = 4;  // at most; 1 on grids too small to fill the GPU
constexpr int64_t kPoolTargetBlocks = 1024;  // enough blocks to fill an H100/H200 several times over
constexpr int kMinPoolLoadsPerThread = 4;

struct SeParams {
  const void* x;
  void* y;
  float* partial;  // [N, splits, C]
  float* scale;    // [N, C]
  int N, C, HW;
  // pool
  int splits;          // chunks per plane
  int chunk;           // NCHW: vectors per chunk; channels_last: rows per chunk
  int group_threads;   // NCHW: threads per plane (power of two); channels_last: threads along channel vectors
  int groups;          // NCHW: planes per block; channels_last: threads along rows (power of two)
  int channel_blocks;  // channels_last: blocks along the channel vectors
  // scale
  int vectors_per_sample, blocks_per_sample, vectors_per_thread;
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
      load_floats<T, VEC>(x + v * VEC, xv);
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
      load_floats<T, VEC>(x + r * p.C, xv);
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
  extern __shared__ float smem[];
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
  extern __shared__ float smem[];
  pool_cl_sum_thread<T, VEC>(p, blockIdx.x, threadIdx.x, smem);
  for (int stride = p.groups / 2; stride > 0; stride /= 2) {
    __syncthreads();
    pool_cl_tree_thread<VEC>(p, threadIdx.x, stride, smem);
  }
  __syncthreads();
  pool_cl_store_thread<VEC>(p, blockIdx.x, threadIdx.x, smem);
}

// ---------------------------------------------------------------------------------------------------- mlp
// out[n][row] = finish(sum_k weight[row][k] * in(n, k) + bias[row]) with in(n, k) = in_scale * the sum over
// `splits` of in[n][split][k], and finish the activation (hidden layer) or the gate (scale).
struct MatvecParams {
  const float* in;
  int splits;
  float in_scale;
  const float* weight;  // [rows, K]
  const float* bias;    // [rows] or null
  float* out;           // [N, rows]
  int N, rows, K;
  int row_threads;  // threads per row: 32 .. kMlpThreads, a power of two
  int row_blocks;   // blocks along the rows
  bool is_gate;
  ActivationSpec activation;
  Gate gate;
};

struct MatvecState {
  float acc[kMlpSamples];
};

struct MatvecThread {
  int row, lane, n0, block_row;
};

MBK_HOST_DEVICE MatvecThread matvec_thread(const MatvecParams& p, int64_t block, int thread) {
  const int b = static_cast<int>(block);
  const int rows_per_block = kMlpThreads / p.row_threads;
  const int block_row = thread / p.row_threads;
  return {b % p.row_blocks * rows_per_block + block_row, thread % p.row_threads, b / p.row_blocks * kMlpSamples,
          block_row};
}

// Phase: the block's samples' inputs k0 .. k0 + kMlpChunk into smem[sample][k - k0] (zeros past N and K), VW at
// a time (VW divides K).
template <int VW>
MBK_HOST_DEVICE void matvec_stage_thread(const MatvecParams& p, int64_t block, int thread, int k0, float* smem) {
  const int n0 = matvec_thread(p, block, thread).n0;
  for (int i = thread * VW; i < kMlpSamples * kMlpChunk; i += kMlpThreads * VW) {
    const int n = n0 + i / kMlpChunk;
    const int k = k0 + i % kMlpChunk;
    float sum[VW] = {};
    if (n < p.N && k < p.K) {
      const float* in = p.in + int64_t(n) * p.splits * p.K + k;
      for (int split = 0; split < p.splits; ++split) {
        float part[VW];
        load_floats<float, VW>(in + split * p.K, part);
#pragma unroll
        for (int j = 0; j < VW; ++j) sum[j] += part[j];
      }
    }
#pragma unroll
    for (int j = 0; j < VW; ++j) sum[j] *= p.in_scale;
    store_floats<float, VW>(smem + i, sum);
  }
}

// Phase: this thread's lane of its row over the staged chunk, VW weights per load, for every sample.
template <int VW>
MBK_HOST_DEVICE void matvec_accumulate_thread(const MatvecParams& p, int64_t block, int thread, int k0,
                                              const float* smem, MatvecState& state) {
  const MatvecThread t = matvec_thread(p, block, thread);
  if (t.row >= p.rows) return;
  const float* w_row = p.weight + int64_t(t.row) * p.K;
  const int end = min_int(k0 + kMlpChunk, p.K);
#pragma unroll 4
  for (int k = k0 + t.lane * VW; k < end; k += p.row_threads * VW) {
    float w[VW];
    load_floats<float, VW>(w_row + k, w);
#pragma unroll
    for (int s = 0; s < kMlpSamples; ++s) {
      float in[VW];
      load_floats<float, VW>(smem + s * kMlpChunk + (k - k0), in);
#pragma unroll
      for (int i = 0; i < VW; ++i) state.acc[s] = fmaf(w[i], in[i], state.acc[s]);
    }
  }
}

// Phase: the accumulators into smem[block_row][sample][lane] (padded: no bank conflicts).
MBK_HOST_DEVICE void matvec_partials_thread(const MatvecParams& p, int64_t block, int thread, float* smem,
                                            const MatvecState& state) {
  const MatvecThread t = matvec_thread(p, block, thread);
#pragma unroll
  for (int s = 0; s < kMlpSamples; ++s)
    smem[(t.block_row * kMlpSamples + s) * (p.row_threads + 1) + t.lane] = state.acc[s];
}

// Phase: one thread per (row, sample) adds the lanes in order, the bias, and finishes.
MBK_HOST_DEVICE void matvec_finish_thread(const MatvecParams& p, int64_t block, int thread, const float* smem) {
  const int rows_per_block = kMlpThreads / p.row_threads;
  const MatvecThread first = matvec_thread(p, block, 0);
  for (int i = thread; i < rows_per_block * kMlpSamples; i += kMlpThreads) {
    const int row = first.row + i / kMlpSamples;
    const int n = first.n0 + i % kMlpSamples;
    if (row >= p.rows || n >= p.N) continue;
    float sum = p.bias ? load_ro(p.bias + row) : 0.f;
    for (int lane = 0; lane < p.row_threads; ++lane) sum += smem[i * (p.row_threads + 1) + lane];
    p.out[int64_t(n) * p.rows + row] = p.is_gate ? apply_gate(sum, p.gate) : apply_activation(sum, p.activation);
  }
}

template <int VW>
__global__ void __launch_bounds__(kMlpThreads) matvec_kernel(const MatvecParams p) {
  extern __shared__ float smem[];
  MatvecState state{};
  for (int k0 = 0; k0 < p.K; k0 += kMlpChunk) {
    matvec_stage_thread<VW>(p, blockIdx.x, threadIdx.x, k0, smem);
    __syncthreads();
    matvec_accumulate_thread<VW>(p, blockIdx.x, threadIdx.x, k0, smem, state);
    __syncthreads();
  }
  matvec_partials_thread(p, blockIdx.x, threadIdx.x, smem, state);
  __syncthreads();
  matvec_finish_thread(p, blockIdx.x, threadIdx.x, smem);
}

// -------------------------------------------------------------------------------------------------- scale
template <class T, int VEC, bool CHANNELS_LAST>
MBK_HOST_DEVICE void scale_thread(const SeParams& p, int64_t block, int thread) {
  const int b = static_cast<int>(block);
  const int n = b / p.blocks_per_sample;
  const int first = (b - n * p.blocks_per_sample) * p.vectors_per_thread * kScaleThreads + thread;
  const int64_t sample = int64_t(n) * p.HW * p.C;
  const T* x = static_cast<const T*>(p.x) + sample;
  T* y = static_cast<T*>(p.y) + sample;
  const float* scale = p.scale + n * p.C;
#pragma unroll
  for (int k = 0; k < kScaleVectorsPerThread; ++k) {
    const int vector = first + k * kScaleThreads;
    if (k >= p.vectors_per_thread || vector >= p.vectors_per_sample) return;
    const int e = vector * VEC;
    float s[VEC];
    if (CHANNELS_LAST) {
      load_floats<float, VEC>(scale + e % p.C, s);
    } else {
      const float plane_scale = scale[e / p.HW];  // VEC divides HW: a vector lies in one plane
#pragma unroll
      for (int i = 0; i < VEC; ++i) s[i] = plane_scale;
    }
    float xv[VEC];
    load_floats<T, VEC>(x + e, xv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) xv[i] *= s[i];
    store_floats<T, VEC>(y + e, xv);
  }
}

template <class T, int VEC, bool CHANNELS_LAST>
__global__ void __launch_bounds__(kScaleThreads) scale_kernel(const SeParams p) {
  scale_thread<T, VEC, CHANNELS_LAST>(p, blockIdx.x, threadIdx.x);
}

// ------------------------------------------------------------------------------------------------- plans
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

// The pool's tiles and splits (params' pool fields).
LaunchShape plan_pool(SeParams& p, bool channels_last, int vec) {
  int64_t blocks;
  if (channels_last) {
    const int vectors = p.C / vec;
    p.group_threads = std::min(vectors, kPoolThreads);
    p.groups = pow2_floor(kPoolThreads / p.group_threads);
    p.channel_blocks = ceil_div(vectors, p.group_threads);
    p.splits = pool_splits(int64_t(p.N) * p.channel_blocks, p.HW, p.groups);
    p.chunk = ceil_div(p.HW, p.splits);
    p.splits = ceil_div(p.HW, p.chunk);
    blocks = int64_t(p.N) * p.channel_blocks * p.splits;
  } else {
    const int vectors = p.HW / vec;
    p.group_threads = std::clamp(pow2_ceil(ceil_div(vectors, kMinPoolLoadsPerThread)), 32, kPoolThreads);
    p.groups = kPoolThreads / p.group_threads;
    const int64_t plane_blocks = ceil_div<int64_t>(int64_t(p.N) * p.C, p.groups);
    p.splits = pool_splits(plane_blocks, vectors, p.group_threads);
    p.chunk = ceil_div(vectors, p.splits);
    p.splits = ceil_div(vectors, p.chunk);
    blocks = plane_blocks * p.splits;
  }
  return {blocks, kPoolThreads, int64_t(kPoolThreads) * vec};
}

LaunchShape plan_scale(SeParams& p, int vec) {
  p.vectors_per_sample = p.HW * p.C / vec;
  auto blocks = [&] {
    p.blocks_per_sample = ceil_div(p.vectors_per_sample, kScaleThreads * p.vectors_per_thread);
    return int64_t(p.N) * p.blocks_per_sample;
  };
  p.vectors_per_thread = kScaleVectorsPerThread;
  if (blocks() < kFillBlocks) p.vectors_per_thread = 1;
  return {blocks(), kScaleThreads, 0};
}

// Threads per row: a warp, doubled (split rows) while the grid leaves SMs idle and each lane keeps >= 2 loads.
LaunchShape plan_matvec(MatvecParams& p, int vw) {
  const int64_t sample_tiles = ceil_div(p.N, kMlpSamples);
  p.row_threads = 32;
  auto blocks = [&] { return ceil_div(p.rows, kMlpThreads / p.row_threads) * sample_tiles; };
  while (p.row_threads < kMlpThreads && blocks() < kFillBlocks && p.K >= 4 * p.row_threads * vw)
    p.row_threads *= 2;
  p.row_blocks = ceil_div(p.rows, kMlpThreads / p.row_threads);
  return {blocks(), kMlpThreads, kMlpSamples * kMlpChunk};
}

// --------------------------------------------------------------------------------------------------- launch
template <class T, int VEC>
void launch_pool(SeParams& p, bool channels_last, const Executor& ex) {
  const LaunchShape shape = plan_pool(p, channels_last, VEC);
  auto emulate = [&](auto sum, auto tree, auto store, int tree_width) {
    return [&, sum, tree, store, tree_width](int64_t block, float* smem) {
      emulate_phase(kPoolThreads, [&](int t) { sum(p, block, t, smem); });
      for (int stride = tree_width / 2; stride > 0; stride /= 2)
        emulate_phase(kPoolThreads, [&](int t) { tree(p, t, stride, smem); });
      emulate_phase(kPoolThreads, [&](int t) { store(p, block, t, smem); });
    };
  };
  if (channels_last)
    launch_or_emulate<pool_cl_kernel<T, VEC>>(ex, shape, p,
                      emulate(pool_cl_sum_thread<T, VEC>, pool_cl_tree_thread<VEC>, pool_cl_store_thread<VEC>,
                              p.groups));
  else
    launch_or_emulate<pool_nchw_kernel<T, VEC>>(ex, shape, p,
                      emulate(pool_nchw_sum_thread<T, VEC>, pool_nchw_tree_thread, pool_nchw_store_thread,
                              p.group_threads));
}

void launch_matvec(MatvecParams& p, const Executor& ex) {
  auto run = [&](auto vw) {
    constexpr int VW = decltype(vw)::value;
    const LaunchShape shape = plan_matvec(p, VW);
    launch_or_emulate<matvec_kernel<VW>>(ex, shape, p, [&](int64_t block, float* smem) {
      std::vector<MatvecState> states(kMlpThreads);  // zeros, as on the GPU
      for (int k0 = 0; k0 < p.K; k0 += kMlpChunk) {
        emulate_phase(kMlpThreads, [&](int t) { matvec_stage_thread<VW>(p, block, t, k0, smem); });
        emulate_phase(kMlpThreads, [&](int t) { matvec_accumulate_thread<VW>(p, block, t, k0, smem, states[t]); });
      }
      emulate_phase(kMlpThreads, [&](int t) { matvec_partials_thread(p, block, t, smem, states[t]); });
      emulate_phase(kMlpThreads, [&](int t) { matvec_finish_thread(p, block, t, smem); });
    });
  };
  if (p.K % 4 == 0 && aligned16(p.weight) && aligned16(p.in))
    run(std::integral_constant<int, 4>{});
  else
    run(std::integral_constant<int, 1>{});
}

template <class T, int VEC, bool CHANNELS_LAST>
void launch_scale_layout(SeParams& p, const Executor& ex) {
  const LaunchShape shape = plan_scale(p, VEC);
  launch_or_emulate<scale_kernel<T, VEC, CHANNELS_LAST>>(ex, shape, p, [&](int64_t block, float*) {
    emulate_phase(kScaleThreads, [&](int t) { scale_thread<T, VEC, CHANNELS_LAST>(p, block, t); });
  });
}

template <class T, int VEC>
void launch_scale(SeParams& p, bool channels_last, const Executor& ex) {
  if (channels_last)
    launch_scale_layout<T, VEC, true>(p, ex);
  else
    launch_scale_layout<T, VEC, false>(p, ex);
}

struct SeLayers {
  const float* w_reduce;
  const float* b_reduce;
  const float* w_expand;
  const float* b_expand;
  int R;
  ActivationSpec activation;
  Gate gate;
};

// Scratch (float32, one allocation): the pool's partial sums [N, splits, C], the scale [N, C], the hidden [N, R],
// each starting on a 16-byte boundary for the vector loads. A planning executor launches nothing: no scratch.
template <class T, int VEC>
void run_squeeze_excite(SeParams& p, const SeLayers& layers, bool channels_last, const Tensor* x,
                        const Executor& ex) {
  plan_pool(p, channels_last, VEC);
  const int64_t n = p.N;
  auto whole_vectors = [](int64_t floats) { return ceil_div<int64_t>(floats, 4) * 4; };
  const int64_t partial_floats = whole_vectors(n * p.splits * p.C), scale_floats = whole_vectors(n * p.C);
  Tensor scratch;
  p.partial = static_cast<float*>(planning_address());
  if (!ex.plan()) {
    const int64_t scratch_floats = partial_floats + scale_floats + n * layers.R;
    scratch = empty_on(*x, {&scratch_floats, 1}, ScalarType::Float);
    p.partial = static_cast<float*>(scratch.data_ptr());
  }
  p.scale = p.partial + partial_floats;
  float* hidden = p.scale + scale_floats;
  launch_pool<T, VEC>(p, channels_last, ex);
  MatvecParams reduce{p.partial, p.splits, 1.f / static_cast<float>(p.HW), layers.w_reduce, layers.b_reduce,
                      hidden,    p.N,      layers.R, p.C, 0, 0, false, layers.activation, layers.gate};
  launch_matvec(reduce, ex);
  MatvecParams expand{hidden, 1,   1.f, layers.w_expand, layers.b_expand, p.scale, p.N, p.C,
                      layers.R, 0, 0,   true,            layers.activation, layers.gate};
  launch_matvec(expand, ex);
  launch_scale<T, VEC>(p, channels_last, ex);
}

// The launches for x of `dtype` (16-byte vectors where the layout and the pointers allow); the scratch goes on x's
// device (no x: a plan).
void launch_squeeze_excite(SeParams& p, const SeLayers& layers, bool channels_last, ScalarType dtype,
                           const Tensor* x, const Executor& ex) {
  dispatch_float_types(dtype, "squeeze_excite_cuda: x", [&](auto tag) {
    using T = decltype(tag);
    constexpr int VEC = kVec16<T>;
    const bool vectorized =
        (channels_last ? p.C % VEC == 0 : p.HW % VEC == 0) && aligned16(p.x) && aligned16(p.y);
    if (vectorized)
      run_squeeze_excite<T, VEC>(p, layers, channels_last, x, ex);
    else
      run_squeeze_excite<T, 1>(p, layers, channels_last, x, ex);
  });
}

void check_weight(const Tensor& t, const char* name, const Tensor& x, int64_t rows, int64_t cols) {
  MBK_CHECK(t.scalar_type() == ScalarType::Float, "squeeze_excite_cuda: ", name, " must be float32, got ",
            t.scalar_type());
  MBK_CHECK(t.is_contiguous(), "squeeze_excite_cuda: ", name, " must be contiguous");
  MBK_CHECK(t.device() == x.device(), "squeeze_excite_cuda: ", name, " is on ", device_text(t), " but x is on ",
            device_text(x));
  if (cols < 0) {
    MBK_CHECK(t.dim() == 1 && t.size(0) == rows, "squeeze_excite_cuda: ", name, " must be [", rows, "], got ",
              list_text(t.sizes()));
  } else {
    MBK_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "squeeze_excite_cuda: ", name, " must be [",
              rows, ", ", cols, "], got ", list_text(t.sizes()));
  }
}

}  // namespace

std::string squeeze_excite_limit_reason(int64_t N, int64_t C, int64_t H, int64_t W, bool channels_last, int64_t R) {
  const int64_t HW = H * W;
  if (std::max({HW * C, C * R, N * C, N * R}) >= kInt32Limit)
    return "one sample of x [" + std::to_string(N) + ", " + std::to_string(C) + ", " + std::to_string(H) + ", " +
           std::to_string(W) + "] or the weights (R = " + std::to_string(R) +
           ") are too large for the kernels' 32-bit offsets within a sample";
  // The scalar path's plans have the most blocks.
  SeParams p{};
  p.N = static_cast<int>(N);
  p.C = static_cast<int>(C);
  p.HW = static_cast<int>(HW);
  if (N * C * HW == 0) return "";  // nothing to launch
  const int64_t blocks = std::max(plan_pool(p, channels_last, 1).blocks, plan_scale(p, 1).blocks);
  if (blocks >= kInt32Limit) return "x is too large (" + std::to_string(blocks) + " blocks)";
  return "";
}

Tensor squeeze_excite_cuda(const Tensor& x, const Tensor& w_reduce, const std::optional<Tensor>& b_reduce,
                           const Tensor& w_expand, const std::optional<Tensor>& b_expand, std::string_view activation,
                           std::string_view gate) {
  MBK_CHECK(x.dim() == 4, "squeeze_excite_cuda: x must be [N, C, H, W], got ", list_text(x.sizes()));
  MBK_CHECK(x.is_contiguous() || is_channels_last_contiguous(x),
            "squeeze_excite_cuda: x must be contiguous (NCHW or channels_last), got strides ", list_text(x.strides()));
  const int64_t C = x.size(1);
  MBK_CHECK(w_reduce.dim() == 2 && w_reduce.size(0) >= 1,
            "squeeze_excite_cuda: w_reduce must be [R, C] with R >= 1, got ", list_text(w_reduce.sizes()));
  const int64_t R = w_reduce.size(0);
  check_weight(w_reduce, "w_reduce", x, R, C);
  check_weight(w_expand, "w_expand", x, C, R);
  if (b_reduce) check_weight(*b_reduce, "b_reduce", x, R, -1);
  if (b_expand) check_weight(*b_expand, "b_expand", x, C, -1);
  const ActivationSpec spec = parse_activation(activation, "squeeze_excite_cuda");
  const int gate_code = gate_index(gate);
  MBK_CHECK(gate_code >= 0, "squeeze_excite_cuda: unknown gate '", gate, "'; expected one of ",
            name_list(kGateNames));
  const bool channels_last = is_channels_last(x);
  const std::string limit = squeeze_excite_limit_reason(x.size(0), C, x.size(2), x.size(3), channels_last, R);
  MBK_CHECK(limit.empty(), "squeeze_excite_cuda: ", limit);

  Tensor y = empty_on(x, x.sizes(), x.scalar_type(), channels_last);
  if (y.numel() == 0) return y;

  SeParams p{};
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.N = static_cast<int>(x.size(0));
  p.C = static_cast<int>(C);
  p.HW = static_cast<int>(x.size(2) * x.size(3));
  const auto floats = [](const Tensor& t) { return static_cast<const float*>(t.data_ptr()); };
  const SeLayers layers{floats(w_reduce),
                        b_reduce ? floats(*b_reduce) : nullptr,
                        floats(w_expand),
                        b_expand ? floats(*b_expand) : nullptr,
                        static_cast<int>(R),
                        spec,
                        static_cast<Gate>(gate_code)};
  const Executor ex(x);
  launch_squeeze_excite(p, layers, channels_last, x.scalar_type(), &x, ex);
  return y;
}

std::vector<KernelLaunch> squeeze_excite_launch_plan(int64_t N, int64_t C, int64_t H, int64_t W, bool channels_last,
                                                     int64_t R, ScalarType dtype) {
  MBK_CHECK(N >= 0 && C >= 0 && H >= 0 && W >= 0 && R >= 1,
            "squeeze_excite_launch_plan: sizes must be >= 0 and R >= 1, got N=", N, ", C=", C, ", H=", H, ", W=", W,
            ", R=", R);
  const std::string limit = squeeze_excite_limit_reason(N, C, H, W, channels_last, R);
  MBK_CHECK(limit.empty(), "squeeze_excite_launch_plan: ", limit);
  std::vector<KernelLaunch> plan;
  if (N * C * H * W == 0) return plan;  // the op launches nothing
  SeParams p{};
  p.x = p.y = planning_address();
  p.N = static_cast<int>(N);
  p.C = static_cast<int>(C);
  p.HW = static_cast<int>(H * W);
  const float* weights = static_cast<const float*>(planning_address());
  const SeLayers layers{weights, weights, weights, weights, static_cast<int>(R), ActivationSpec{}, Gate{}};
  launch_squeeze_excite(p, layers, channels_last, dtype, nullptr, Executor(&plan));
  return plan;
}

}  // namespace mbkernels
