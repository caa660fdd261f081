// What the kernels of csrc/*.cu share: float conversions of the storage types, 16-byte packs and predicated
// loads, the dtype switch, the launch limits, and the one helper that launches a kernel or emulates it.
//
// Emulation model. A kernel's body is written as `__host__ __device__` functions of (params, block index,
// thread index, shared memory), one function per phase between two __syncthreads(). The __global__ kernel calls
// the phases in order with a barrier between them; on the host, launch_or_emulate runs the blocks one after
// another and the block's runner calls `emulate_phase` for each phase: phase 1 for every thread, then phase 2,
// and so on. That is exactly the ordering guarantee __syncthreads() gives, so code that is correct under the
// emulation for every (block, thread) ordering of a phase is correct on the GPU. Values a thread keeps in
// registers across a barrier are a state struct: a local on the GPU, one per thread in the block's runner.
// Emulated shared memory starts as NaN, so reading a slot nobody wrote shows up in the output.
#pragma once

#include "activations.cuh"  // MBK_HOST_DEVICE

#include <torch/csrc/inductor/aoti_torch/c/shim.h>  // aoti_torch_get_current_cuda_stream (USE_CUDA)
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/device.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "ops.h"  // KernelLaunch

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

// N consecutive elements in 16-byte pieces (one piece when N * sizeof(T) <= 16): p must be aligned to a piece.
template <class T, int N>
constexpr int kPiece = N * sizeof(T) >= 16 ? kVec16<T> : N;

template <class T, int N>
MBK_HOST_DEVICE Pack<T, N> load_pack(const T* p) {
  static_assert(N % kPiece<T, N> == 0, "a pack is a whole number of pieces");
  constexpr int PIECE = kPiece<T, N>;
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; i += PIECE) {
#ifdef __CUDA_ARCH__
    *reinterpret_cast<Pack<T, PIECE>*>(pack.v + i) = *reinterpret_cast<const Pack<T, PIECE>*>(p + i);
#else
    std::memcpy(pack.v + i, p + i, sizeof(Pack<T, PIECE>));
#endif
  }
  return pack;
}

// load_pack where `valid`, zeros elsewhere: a predicated load, no branch around it. The zeros are whole 32-bit
// words (zeroing 16-bit elements one by one splits the pack over twice the registers).
template <class T, int N>
MBK_HOST_DEVICE Pack<T, N> load_pack_if(const T* p, bool valid) {
  if constexpr (sizeof(Pack<T, N>) % 4 == 0) {
    union {
      Pack<T, N> pack;
      uint32_t words[sizeof(Pack<T, N>) / 4];
    } bits;
#pragma unroll
    for (int i = 0; i < int(sizeof(bits.words) / 4); ++i) bits.words[i] = 0;
    if (valid) bits.pack = load_pack<T, N>(p);
    return bits.pack;
  } else {
    Pack<T, N> pack;
#pragma unroll
    for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(0.f);
    if (valid) pack = load_pack<T, N>(p);
    return pack;
  }
}

template <class T, int N>
MBK_HOST_DEVICE void load_floats(const T* p, float (&out)[N]) {
  const Pack<T, N> pack = load_pack<T, N>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
}

template <class T, int N>
MBK_HOST_DEVICE void store_floats(T* p, const float (&in)[N]) {
  constexpr int PIECE = kPiece<T, N>;
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(in[i]);
#pragma unroll
  for (int i = 0; i < N; i += PIECE) {
#ifdef __CUDA_ARCH__
    *reinterpret_cast<Pack<T, PIECE>*>(p + i) = *reinterpret_cast<const Pack<T, PIECE>*>(pack.v + i);
#else
    std::memcpy(p + i, pack.v + i, sizeof(Pack<T, PIECE>));
#endif
  }
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

// a / b rounded towards minus infinity (b > 0).
MBK_HOST_DEVICE int floor_div(int a, int b) { return a >= 0 ? a / b : -((b - 1 - a) / b); }

// std::min is constexpr-only on the device (needs --expt-relaxed-constexpr, which not every build passes).
MBK_HOST_DEVICE int min_int(int a, int b) { return a < b ? a : b; }

// f(T{}) with T the CUDA storage type of float32/float16/bfloat16 tensors.
template <class F>
void dispatch_float_types(ScalarType type, const char* what, F&& f) {
  switch (type) {
    case ScalarType::Float:
      return f(float{});
    case ScalarType::Half:
      return f(__half{});
    case ScalarType::BFloat16:
      return f(__nv_bfloat16{});
    default:
      MBK_CHECK(false, what, " must be float32, float16 or bfloat16, got ", type);
  }
}

// Offsets within one sample (and counts of planes, blocks) are 32-bit; offsets across samples are 64-bit.
constexpr int64_t kInt32Limit = int64_t(1) << 31;
// Shared memory a block gets without opting in.
constexpr int64_t kDefaultSmemBytes = 48 * 1024;
// Blocks for one per SM of an H100/H200 (132 SMs): launchers split work finer rather than launch fewer.
constexpr int64_t kFillBlocks = 132;

// Whether a 4-D x is channels_last-contiguous (torch's rule: dimensions of size 1 take any stride).
inline bool is_channels_last_contiguous(const Tensor& x) {
  int64_t expected = 1;
  for (const int64_t d : {1, 3, 2, 0}) {
    if (x.size(d) == 1) continue;
    if (x.stride(d) != expected) return false;
    expected *= x.size(d);
  }
  return true;
}

// NCHW- or channels_last-contiguous x: which of the two (a tensor that is both, e.g. C == 1, counts as NCHW).
inline bool is_channels_last(const Tensor& x) { return is_channels_last_contiguous(x) && !x.is_contiguous(); }

// A new tensor of these sizes, dtype and layout on x's device.
inline Tensor empty_on(const Tensor& x, IntHeaderOnlyArrayRef sizes, ScalarType dtype, bool channels_last = false) {
  return torch::stable::empty(sizes, dtype, std::nullopt, x.device(), std::nullopt,
                              channels_last ? torch::headeronly::MemoryFormat::ChannelsLast
                                            : torch::headeronly::MemoryFormat::Contiguous);
}

// Where a launcher runs its kernels: on the GPU (on torch's current stream of x's device, through the stable
// shim), emulated on the host, or nowhere: a planning executor only records each launch the launcher would make
// (the *_launch_plan functions).
class Executor {
 public:
  explicit Executor(const Tensor& x) : on_device_(x.is_cuda()) {
    if (on_device_) {
      const int32_t device = x.get_device_index();
      guard_.emplace(device);
      void* stream = nullptr;
      TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
      stream_ = static_cast<cudaStream_t>(stream);
    }
  }
  explicit Executor(std::vector<KernelLaunch>* plan) : on_device_(false), plan_(plan) {}
  bool on_device() const { return on_device_; }
  cudaStream_t stream() const { return stream_; }
  std::vector<KernelLaunch>* plan() const { return plan_; }

 private:
  bool on_device_;
  cudaStream_t stream_ = nullptr;
  std::optional<torch::stable::accelerator::DeviceGuard> guard_;
  std::vector<KernelLaunch>* plan_ = nullptr;
};

// What planning passes for tensor pointers: 16-byte aligned, as the caching allocator's blocks are; never read.
inline void* planning_address() {
  alignas(16) static unsigned char storage[16];
  return storage;
}

// The unqualified name of kernel template instance Kernel, e.g. "dwconv_cl_fast_kernel<__half, 3, 1, 2>": the
// demangled device symbol without namespaces, return type and parameters (the host compiler's own spelling).
template <auto Kernel>
std::string kernel_name() {
  const std::string text = __PRETTY_FUNCTION__;  // "... [with auto Kernel = ns::name<args>; ...]" (gcc, clang)
  const std::size_t begin = text.find("Kernel = ") + 9;
  std::size_t end = begin;
  for (int depth = 0; end < text.size(); ++end) {
    const char c = text[end];
    if (c == '<') ++depth;
    if (c == '>') --depth;
    if (depth == 0 && (c == ';' || c == ']')) break;
  }
  std::string name = text.substr(begin, end - begin);
  if (!name.empty() && name[0] == '&') name.erase(0, 1);
  const std::size_t qualifier = name.rfind("::", name.find('<'));
  return qualifier == std::string::npos ? name : name.substr(qualifier + 2);
}

struct LaunchShape {
  int64_t blocks;
  int threads;
  int64_t smem_floats;  // dynamic shared memory
};

// Runs blocks [0, blocks) one after another; run_block(block, smem) gets `smem_floats` of NaN-filled shared memory.
template <class RunBlock>
void emulate_grid(int64_t blocks, int64_t smem_floats, RunBlock&& run_block) {
  std::vector<float> smem(std::max<int64_t>(smem_floats, 1));
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

// The one place kernels start: `Kernel<<<shape>>>(params)` on the device, on the host emulate_block(block, smem)
// for every block (the kernel's phases, each through emulate_phase), or, planning, a record of the launch.
template <auto Kernel, class Params, class EmulateBlock>
void launch_or_emulate(const Executor& ex, const LaunchShape& shape, const Params& params,
                       EmulateBlock&& emulate_block) {
  MBK_CHECK(shape.blocks < kInt32Limit && shape.smem_floats * 4 <= kDefaultSmemBytes,
            "internal error: the launch limits are checked before planning");
  if (ex.plan()) {
    // The kernels declare no static shared memory (tests/test_cuda_plan.py checks): dynamic is all of it.
    ex.plan()->push_back({kernel_name<Kernel>(), shape.blocks, shape.threads,
                          shape.smem_floats * int64_t(sizeof(float))});
    return;
  }
  if (!ex.on_device()) return emulate_grid(shape.blocks, shape.smem_floats, emulate_block);
#ifdef __CUDACC__
  Kernel<<<static_cast<unsigned>(shape.blocks), shape.threads, shape.smem_floats * sizeof(float), ex.stream()>>>(
      params);
  const cudaError_t launched = cudaGetLastError();
  MBK_CHECK(launched == cudaSuccess, "CUDA error: ", cudaGetErrorString(launched), " (launching ",
            kernel_name<Kernel>(), ")");
#endif
}

}  // namespace mbkernels
