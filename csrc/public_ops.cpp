// The public ops mbkernels::dwconv_bn_act and mbkernels::squeeze_excite, defined here so that programs without
// Python (AOTInductor packages of patched models, loaded by torch::inductor::AOTIModelPackageLoader) can run
// them. Their arguments are the fields of the op's bundle in mbkernels/_contract.py, then the backend's name
// (tests/test_signatures.py holds the schemas to them); in a Python process mbkernels.ops puts its own kernels
// (the full backend choice) on these schemas. Here: the CPU kernels are the reference math in ATen, on the
// activation table of the CUDA kernels (activations.cuh); the CUDA kernels call the CUDA kernels' ops
// (csrc/registration.cpp) through the dispatcher.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "activations.cuh"

namespace {

std::string_view view(c10::string_view text) { return {text.data(), text.size()}; }

// An activation spec ("relu", "leaky_relu:0.2"), parsed as the CUDA kernels parse it, in ATen.
at::Tensor apply_activation(const at::Tensor& t, c10::string_view spec, const char* op) {
  using mbkernels::Activation;
  const mbkernels::ActivationSpec activation = mbkernels::parse_activation(view(spec), op);
  switch (activation.kind) {
    case Activation::Identity:
      return t;
    case Activation::ReLU:
      return at::relu(t);
    case Activation::ReLU6:
      return at::hardtanh(t, 0.0, 6.0);
    case Activation::HardSwish:
      return at::hardswish(t);
    case Activation::SiLU:
      return at::silu(t);
    case Activation::GELU:
      return at::gelu(t);
    case Activation::GELUTanh:
      return at::gelu(t, "tanh");
    case Activation::LeakyReLU:
      return at::leaky_relu(t, activation.param);
  }
  TORCH_CHECK(false, op, ": activation '", std::string(spec), "' has no ATen form");
}

at::Tensor apply_gate(const at::Tensor& t, c10::string_view name) {
  using mbkernels::Gate;
  const int code = mbkernels::gate_index(view(name));
  TORCH_CHECK(code >= 0, "squeeze_excite: unknown gate '", std::string(name), "'; expected one of ",
              mbkernels::name_list(mbkernels::kGateNames));
  switch (static_cast<Gate>(code)) {
    case Gate::Sigmoid:
      return at::sigmoid(t);
    case Gate::HardSigmoid:
      return at::hardsigmoid(t);
  }
  TORCH_CHECK(false, "squeeze_excite: gate '", std::string(name), "' has no ATen form");
}

at::MemoryFormat memory_format_of(const at::Tensor& x) {
  const bool channels_last = x.dim() == 4 && !x.is_contiguous() && x.stride(1) == 1 && x.size(1) > 1;
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "x must be a 4-D [N, C, H, W] tensor, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "x must be float32, float16 or bfloat16, got ", x.scalar_type());
}

std::vector<int64_t> padding4(c10::SymIntArrayRef padding) {
  TORCH_CHECK(padding.size() == 2 || padding.size() == 4,
              "padding must be [h, w] or [top, bottom, left, right], got ", padding.size(), " values");
  std::vector<int64_t> values;
  for (const auto& v : padding) values.push_back(v.expect_int());
  if (values.size() == 2) return {values[0], values[0], values[1], values[1]};
  return values;
}

std::vector<int64_t> ints(c10::SymIntArrayRef values) {
  std::vector<int64_t> out;
  for (const auto& v : values) out.push_back(v.expect_int());
  return out;
}

// The backends a C++ program has: the reference math (any device) and, on CUDA tensors, the CUDA kernels.
bool use_cuda_kernels(const at::Tensor& x, c10::string_view backend) {
  TORCH_CHECK(backend.empty() || backend == "reference" || backend == "cuda", "the ", std::string(backend),
              " backend is not available without Python; C++ programs run reference (any device) or cuda");
  TORCH_CHECK(backend != "cuda" || x.is_cuda(), "the cuda backend runs CUDA tensors in C++ programs");
  return x.is_cuda() && backend != "reference";
}

at::Tensor dwconv_bn_act(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         c10::SymIntArrayRef stride, c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation,
                         c10::string_view activation, c10::string_view backend) {
  check_x(x);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(0) % x.size(1) == 0,
              "weight must be [C * M, 1, kh, kw] with C = ", x.size(1), ", got ", weight.sizes());
  const auto pads = padding4(padding);
  const auto format = memory_format_of(x);
  if (use_cuda_kernels(x, backend)) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mbkernels::dwconv_bn_act_cuda", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                           at::IntArrayRef, at::IntArrayRef, c10::string_view)>();
    // The layout the kernels read: the weight tap-major (channel innermost), float32 (see _contract.tap_major).
    const at::Tensor tap_major = weight.to(at::kFloat).permute({2, 3, 1, 0}).contiguous().permute({3, 2, 0, 1});
    return op.call(x.contiguous(format), tap_major, bias.to(at::kFloat).contiguous(), ints(stride), pads,
                   ints(dilation), activation);
  }
  // F.pad order: [left, right, top, bottom].
  const at::Tensor padded = at::constant_pad_nd(x.to(at::kFloat), {pads[2], pads[3], pads[0], pads[1]}, 0.0);
  const std::vector<int64_t> no_padding = {0, 0};
  const at::Tensor y = at::conv2d(padded, weight.to(at::kFloat), bias.to(at::kFloat), ints(stride), no_padding,
                                  ints(dilation), x.size(1));
  return apply_activation(y, activation, "dwconv_bn_act").to(x.scalar_type()).contiguous(format);
}

at::Tensor squeeze_excite(const at::Tensor& x, const at::Tensor& w_reduce, const std::optional<at::Tensor>& b_reduce,
                          const at::Tensor& w_expand, const std::optional<at::Tensor>& b_expand,
                          c10::string_view activation, c10::string_view gate, c10::string_view backend) {
  check_x(x);
  const auto format = memory_format_of(x);
  const at::Tensor reduce = w_reduce.flatten(1).to(at::kFloat).contiguous();
  const at::Tensor expand = w_expand.flatten(1).to(at::kFloat).contiguous();
  const auto as_float = [](const std::optional<at::Tensor>& b) -> std::optional<at::Tensor> {
    return b.has_value() ? std::optional<at::Tensor>(b->to(at::kFloat).contiguous()) : std::nullopt;
  };
  if (use_cuda_kernels(x, backend)) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mbkernels::squeeze_excite_cuda", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                           const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                                           c10::string_view)>();
    return op.call(x.contiguous(format), reduce, as_float(b_reduce), expand, as_float(b_expand), activation, gate);
  }
  const at::Tensor x32 = x.to(at::kFloat);
  const at::Tensor hidden =
      apply_activation(at::linear(x32.mean({2, 3}), reduce, as_float(b_reduce)), activation, "squeeze_excite");
  const at::Tensor scale = apply_gate(at::linear(hidden, expand, as_float(b_expand)), gate);
  return (x32 * scale.unsqueeze(-1).unsqueeze(-1)).to(x.scalar_type()).contiguous(format);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mbkernels, m) {
  m.def(
      "dwconv_bn_act(Tensor x, Tensor weight, Tensor bias, SymInt[] stride, SymInt[] padding, SymInt[] dilation, "
      "str activation, str backend) -> Tensor");
  m.def(
      "squeeze_excite(Tensor x, Tensor w_reduce, Tensor? b_reduce, Tensor w_expand, Tensor? b_expand, "
      "str activation, str gate, str backend) -> Tensor");
}

TORCH_LIBRARY_IMPL(mbkernels, CPU, m) {
  m.impl("dwconv_bn_act", &dwconv_bn_act);
  m.impl("squeeze_excite", &squeeze_excite);
}

TORCH_LIBRARY_IMPL(mbkernels, CUDA, m) {
  m.impl("dwconv_bn_act", &dwconv_bn_act);
  m.impl("squeeze_excite", &squeeze_excite);
}

// Inference ops: backward through them fails with a clear error (the fused modules run the stock layers when
// gradients are needed), rather than the dispatcher's warn-only fallback.
TORCH_LIBRARY_IMPL(mbkernels, Autograd, m) {
  m.impl("dwconv_bn_act", torch::autograd::autogradNotImplementedFallback());
  m.impl("squeeze_excite", torch::autograd::autogradNotImplementedFallback());
}
