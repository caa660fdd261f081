// The native ops' C++ entry points and their limits. Schemas: csrc/registration.cpp. Each op runs its CUDA
// kernels on CUDA tensors and their host emulation (the very same kernel code) on CPU tensors, for testing
// without a GPU. Written against PyTorch's stable ABI (torch/csrc/stable, torch/headeronly): the library
// uses no C++ symbol of torch, so one build loads under every torch from TORCH_TARGET_VERSION on.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/HeaderOnlyArrayRef.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace mbkernels {

using torch::stable::Tensor;
using torch::headeronly::IntHeaderOnlyArrayRef;
using torch::headeronly::ScalarType;

// act(depthwise_conv2d(x, weight, bias)) with depth multiplier M = C_out / C (output channel o reads input
// channel o / M). x [N, C, H, W] float32/float16/bfloat16, NCHW- or channels_last-contiguous; the output
// [N, C_out, out_h, out_w] keeps x's dtype and layout. weight [C_out, 1, kh, kw] and bias [C_out] float32 (BN
// folded in), any strides: tap-major weight (stride(0) == 1, element (o, 0, i, j) at (i * kw + j) * C_out + o)
// is used as it is, any other layout is copied to it. padding is [top, bottom, left, right]. activation is
// "name" or "name:param" (kActivationNames in activations.cuh).
Tensor dwconv_bn_act_cuda(const Tensor& x, const Tensor& weight, const Tensor& bias, IntHeaderOnlyArrayRef stride,
                          IntHeaderOnlyArrayRef padding, IntHeaderOnlyArrayRef dilation, std::string_view activation);

// x * gate(w_expand @ act(w_reduce @ mean_hw(x) + b_reduce) + b_expand); weights float32 [R, C] / [C, R],
// contiguous; act any activation of the table, gate "sigmoid" or "hardsigmoid".
Tensor squeeze_excite_cuda(const Tensor& x, const Tensor& w_reduce, const std::optional<Tensor>& b_reduce,
                           const Tensor& w_expand, const std::optional<Tensor>& b_expand, std::string_view activation,
                           std::string_view gate);

// What a dwconv_bn_act_cuda call's launcher needs to know to tell whether it can run it.
struct DwconvShape {
  int64_t N, C, H, W;
  bool channels_last;
  int64_t C_out, kh, kw;
  std::array<int64_t, 2> stride;
  std::array<int64_t, 4> padding;  // top, bottom, left, right
  std::array<int64_t, 2> dilation;
};

// "" when the launchers can run the case, else why not (one line): exactly the conditions they TORCH_CHECK.
std::string dwconv_bn_act_limit_reason(const DwconvShape& shape);
std::string squeeze_excite_limit_reason(int64_t N, int64_t C, int64_t H, int64_t W, bool channels_last, int64_t R);

// One kernel launch of a launcher's plan: the kernel's unqualified name as the demangled device symbol spells it
// ("dwconv_cl_fast_kernel<__half, 3, 1, 2>"), blocks in the grid, threads per block, shared memory per block.
struct KernelLaunch {
  std::string kernel;
  int64_t blocks;
  int threads;
  int64_t shared_bytes;
};

// The launches the op's launcher makes for x of this shape and dtype, in order, computed by the launcher's own
// code without launching (x, y and the weights taken as 16-byte aligned, as the caching allocator gives them).
// Throws the op's error for a case it cannot run.
std::vector<KernelLaunch> dwconv_bn_act_launch_plan(const DwconvShape& shape, ScalarType dtype);
std::vector<KernelLaunch> squeeze_excite_launch_plan(int64_t N, int64_t C, int64_t H, int64_t W, bool channels_last,
                                                     int64_t R, ScalarType dtype);

}  // namespace mbkernels
