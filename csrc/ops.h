// The native ops' C++ entry points. Schemas: csrc/registration.cpp. Each op has a CUDA kernel and a
// host emulation that runs the very same kernel code on CPU tensors (for testing without a GPU).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace mbkernels {

// act(depthwise_conv2d(x, weight, bias)); weight [C, 1, kh, kw] and bias [C] float32 (BN folded in);
// x [N, C, H, W] float32/float16/bfloat16, NCHW- or channels_last-contiguous; the output keeps x's layout.
at::Tensor dwconv_bn_act_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              c10::string_view activation);
at::Tensor dwconv_bn_act_emulated(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  c10::string_view activation);

// x * gate(w_expand @ act(w_reduce @ mean_hw(x) + b_reduce) + b_expand); weights float32 [R, C] / [C, R].
at::Tensor squeeze_excite_cuda(const at::Tensor& x, const at::Tensor& w_reduce,
                               const std::optional<at::Tensor>& b_reduce, const at::Tensor& w_expand,
                               const std::optional<at::Tensor>& b_expand, c10::string_view activation,
                               c10::string_view gate);
at::Tensor squeeze_excite_emulated(const at::Tensor& x, const at::Tensor& w_reduce,
                                   const std::optional<at::Tensor>& b_reduce, const at::Tensor& w_expand,
                                   const std::optional<at::Tensor>& b_expand, c10::string_view activation,
                                   c10::string_view gate);

}  // namespace mbkernels
