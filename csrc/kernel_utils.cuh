// What the kernels of csrc/*.cu share: float conversions of the storage types, 16-byte packs, read-only loads,
// the dtype switch, and the host emulation of a CUDA grid.
//
// Emulation model. A kernel's body is written as `__host__ __device__` functions of (params, block index,
// thread index, shared memory), one function per phase between two __syncthreads(). The __global__ kernel calls
// the phases in order with a barrier between them; on the host, `emulate_grid` runs the blocks one after
// another and the block's runner calls `emulate_phase` for each phase: phase 1 for every thread, then phase 2,
// and so on. That is exactly the ordering guarantee __syncthreads() gives, so code that is correct under the
// emulation for every (block, thread) ordering of a phase is correct on the GPU. Emulated shared memory starts
// as NaN, so reading a slot nobody wrote shows up in the output.
#pragma once

#include "activations.cuh"  // MBK_HOST_DEVICE

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace mbkernels {

MBK_HOST_DEVICE float to_float(float v) { return v; }
MBK_HOST_DEVICE float to_float(__half v) { return __half2float(v); }
MBK_HOST_DEVICE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
MBK_HOST_DEVICE T from_float(float v);
template <>
MBK_HOST_DEVICE float from_float<float>(float v) { return v; }
template <>
MBK_HOST_DEVICE __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
MBK_HOST_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Elements of T in one 16-byte load.
template <class T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// N consecutive elements (one vector load when N * sizeof(T) is 16) as floats; p must be aligned to the pack.
template <class T, int N>
MBK_HOST_DEVICE void load_floats(const T* p, float (&out)[N]) {
  Pack<T, N> pack;
#ifdef __CUDA_ARCH__
  pack = *reinterpret_cast<const Pack<T, N>*>(p);
#else
  std::memcpy(&pack, p, sizeof(pack));
#endif
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
}

template <class T, int N>
MBK_HOST_DEVICE void store_floats(T* p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(in[i]);
#ifdef __CUDA_ARCH__
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
#else
  std::memcpy(p, &pack, sizeof(pack));
#endif
}

// A float that every thread of a block reads (weights, biases): the read-only cache path on the GPU.
MBK_HOST_DEVICE float load_ro(const float* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <class I>
MBK_HOST_DEVICE I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

// std::min is constexpr-only on the device (needs --expt-relaxed-constexpr, which not every build passes).
MBK_HOST_DEVICE int min_int(int a, int b) { return a < b ? a : b; }

// f(T{}) with T the CUDA storage type of float32/float16/bfloat16 tensors.
template <class F>
void dispatch_float_types(c10::ScalarType type, const char* what, F&& f) {
  switch (type) {
    case c10::ScalarType::Float:
      return f(float{});
    case c10::ScalarType::Half:
      return f(__half{});
    case c10::ScalarType::BFloat16:
      return f(__nv_bfloat16{});
    default:
      TORCH_CHECK(false, what, " must be float32, float16 or bfloat16, got ", type);
  }
}

// Where a launcher runs its kernels: on the GPU (on `stream`), or emulated on the host.
struct Executor {
  bool on_device;
  cudaStream_t stream;
};

// Runs blocks [0, blocks) one after another; run_block(block, smem) gets `smem_floats` of NaN-filled shared memory.
template <class RunBlock>
void emulate_grid(int64_t blocks, size_t smem_floats, RunBlock&& run_block) {
  std::vector<float> smem(std::max<size_t>(smem_floats, 1));
  for (int64_t block = 0; block < blocks; ++block) {
    std::fill(smem.begin(), smem.end(), std::numeric_limits<float>::quiet_NaN());
    run_block(block, smem.data());
  }
}

// One phase of a block: every thread runs `phase(thread)` before any thread starts the next phase.
template <class Phase>
void emulate_phase(int threads, Phase&& phase) {
  for (int thread = 0; thread < threads; ++thread) phase(thread);
}

}  // namespace mbkernels
