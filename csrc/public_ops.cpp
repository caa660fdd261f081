// The public ops mbkernels::dwconv_bn_act and mbkernels::squeeze_excite, defined here so that programs without
// Python (AOTInductor packages of patched models, loaded by torch::inductor::AOTIModelPackageLoader) can run
// them. Their schemas are those mbkernels/ops.py registers; in a Python process mbkernels.ops puts its own
// kernels (the full backend choice) on these schemas. Here: the CPU kernels are the reference math in ATen;
// the CUDA kernels call the CUDA kernels' ops (csrc/registration.cpp) through the dispatcher.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

namespace {

// "relu", "leaky_relu:0.2": the activation specs of mbkernels/activations.py.
at::Tensor apply_activation(const at::Tensor& t, c10::string_view spec) {
  const std::string text(spec);
  const auto colon = text.find(':');
  const std::string name = text.substr(0, colon);
  if (name == "leaky_relu") {
    return at::leaky_relu(t, colon == std::string::npos ? 0.01 : std::stod(text.substr(colon + 1)));
  }
  TORCH_CHECK(colon == std::string::npos, "activation '", name, "' takes no parameter, got '", text, "'");
  if (name == "identity") return t;
  if (name == "relu") return at::relu(t);
  if (name == "relu6") return at::hardtanh(t, 0.0, 6.0);
  if (name == "hardswish") return at::hardswish(t);
  if (name == "silu") return at::silu(t);
  if (name == "gelu") return at::gelu(t);
  if (name == "gelu_tanh") return at::gelu(t, "tanh");
  TORCH_CHECK(false, "unknown activation '", name,
              "'; expected one of identity, relu, relu6, hardswish, silu, gelu, gelu_tanh, leaky_relu");
}

at::Tensor apply_gate(const at::Tensor& t, c10::string_view gate) {
  if (gate == "sigmoid") return at::sigmoid(t);
  if (gate == "hardsigmoid") return at::hardsigmoid(t);
  TORCH_CHECK(false, "unknown gate '", std::string(gate), "'; expected sigmoid or hardsigmoid");
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
  return apply_activation(y, activation).to(x.scalar_type()).contiguous(format);
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
  const at::Tensor hidden = apply_activation(at::linear(x32.mean({2, 3}), reduce, as_float(b_reduce)), activation);
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
