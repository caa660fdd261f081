// The public ops mbkernels::dwconv_bn_act and mbkernels::squeeze_excite, defined here so that programs without
// Python (AOTInductor packages of patched models, loaded by torch::inductor::AOTIModelPackageLoader) can run
// them. Their arguments are the fields of the op's bundle in mbkernels/_contract.py, then the backend's name
// (tests/test_signatures.py holds the schemas to them); in a Python process mbkernels.ops puts its own kernels
// (the full backend choice) on these schemas, and mbkernels._native refuses their backward (the stable ABI
// registers no autograd kernel). Here: the CPU kernels are the reference math in ATen, on the activation table
// of the CUDA kernels (activations.cuh), called through the stable ABI's dispatcher shim; the CUDA kernels are
// the CUDA kernels' entry points (csrc/ops.h).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <array>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "activations.cuh"
#include "ops.h"

namespace {

using mbkernels::IntHeaderOnlyArrayRef;
using mbkernels::ScalarType;
using mbkernels::Tensor;
using torch::headeronly::MemoryFormat;

// An ATen op through the dispatcher shim: every argument of its schema, in order (the stable ABI converts them;
// it has no Scalar, so the ops below take none).
template <class... Args>
Tensor aten(const char* name, const char* overload, const Args&... args) {
  std::array<StableIValue, sizeof...(Args)> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

Tensor unary(const char* name, const Tensor& t) { return aten(name, "", t); }

Tensor as_float(const Tensor& t) { return torch::stable::to(t, ScalarType::Float); }

// An activation spec ("relu", "leaky_relu:0.2"), parsed as the CUDA kernels parse it, in ATen.
Tensor apply_activation(const Tensor& t, std::string_view spec, const char* op) {
  using mbkernels::Activation;
  const mbkernels::ActivationSpec activation = mbkernels::parse_activation(spec, op);
  switch (activation.kind) {
    case Activation::Identity:
      return t;
    case Activation::ReLU:
      return unary("aten::relu", t);
    case Activation::ReLU6:
      return unary("aten::relu6", t);
    case Activation::HardSwish:
      return unary("aten::hardswish", t);
    case Activation::SiLU:
      return unary("aten::silu", t);
    case Activation::GELU:
      return aten("aten::gelu", "", t, std::string("none"));
    case Activation::GELUTanh:
      return aten("aten::gelu", "", t, std::string("tanh"));
    case Activation::LeakyReLU: {
      // leaky_relu takes its slope as a Scalar: prelu with one weight computes the same.
      const std::array<int64_t, 1> one{1};
      const Tensor slope = torch::stable::fill_(torch::stable::new_empty(t, one), activation.param);
      return aten("aten::prelu", "", t, slope);
    }
  }
  MBK_CHECK(false, op, ": activation '", spec, "' has no ATen form");
}

Tensor apply_gate(const Tensor& t, std::string_view name) {
  using mbkernels::Gate;
  const int code = mbkernels::gate_index(name);
  MBK_CHECK(code >= 0, "squeeze_excite: unknown gate '", name, "'; expected one of ",
            mbkernels::name_list(mbkernels::kGateNames));
  switch (static_cast<Gate>(code)) {
    case Gate::Sigmoid:
      return unary("aten::sigmoid", t);
    case Gate::HardSigmoid:
      return unary("aten::hardsigmoid", t);
  }
  MBK_CHECK(false, "squeeze_excite: gate '", name, "' has no ATen form");
}

MemoryFormat memory_format_of(const Tensor& x) {
  const bool channels_last = x.dim() == 4 && !x.is_contiguous() && x.stride(1) == 1 && x.size(1) > 1;
  return channels_last ? MemoryFormat::ChannelsLast : MemoryFormat::Contiguous;
}

void check_x(const Tensor& x) {
  MBK_CHECK(x.dim() == 4, "x must be a 4-D [N, C, H, W] tensor, got shape ", mbkernels::list_text(x.sizes()));
  const ScalarType dtype = x.scalar_type();
  MBK_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Half || dtype == ScalarType::BFloat16,
            "x must be float32, float16 or bfloat16, got ", dtype);
}

std::vector<int64_t> padding4(IntHeaderOnlyArrayRef padding) {
  MBK_CHECK(padding.size() == 2 || padding.size() == 4, "padding must be [h, w] or [top, bottom, left, right], got ",
            padding.size(), " values");
  if (padding.size() == 2) return {padding[0], padding[0], padding[1], padding[1]};
  return padding.vec();
}

// The backends a C++ program has: the reference math (any device) and, on CUDA tensors, the CUDA kernels.
bool use_cuda_kernels(const Tensor& x, std::string_view backend) {
  MBK_CHECK(backend.empty() || backend == "reference" || backend == "cuda", "the ", backend,
            " backend is not available without Python; C++ programs run reference (any device) or cuda");
  MBK_CHECK(backend != "cuda" || x.is_cuda(), "the cuda backend runs CUDA tensors in C++ programs");
  return x.is_cuda() && backend != "reference";
}

Tensor dwconv_bn_act(const Tensor& x, const Tensor& weight, const Tensor& bias, IntHeaderOnlyArrayRef stride,
                     IntHeaderOnlyArrayRef padding, IntHeaderOnlyArrayRef dilation, std::string_view activation,
                     std::string_view backend) {
  check_x(x);
  MBK_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(0) % x.size(1) == 0,
            "weight must be [C * M, 1, kh, kw] with C = ", x.size(1), ", got ", mbkernels::list_text(weight.sizes()));
  const auto pads = padding4(padding);
  const auto format = memory_format_of(x);
  if (use_cuda_kernels(x, backend)) {
    // The layout the kernels read: the weight tap-major (channel innermost), float32 (see _contract.tap_major).
    const std::array<int64_t, 4> taps_last{2, 3, 1, 0}, taps_back{3, 2, 0, 1};
    const Tensor tap_major = torch::stable::permute(
        torch::stable::contiguous(torch::stable::permute(as_float(weight), taps_last)), taps_back);
    return mbkernels::dwconv_bn_act_cuda(torch::stable::contiguous(x, format), tap_major,
                                         torch::stable::contiguous(as_float(bias)), stride, pads, dilation,
                                         activation);
  }
  // pad's order: [left, right, top, bottom].
  const std::vector<int64_t> pad_order{pads[2], pads[3], pads[0], pads[1]}, no_padding{0, 0};
  const Tensor padded = aten("aten::pad", "", as_float(x), pad_order, std::string("constant"), std::optional<double>());
  const Tensor y = aten("aten::conv2d", "", padded, as_float(weight), std::optional<Tensor>(as_float(bias)),
                        stride.vec(), no_padding, dilation.vec(), x.size(1));
  return torch::stable::contiguous(torch::stable::to(apply_activation(y, activation, "dwconv_bn_act"),
                                                     x.scalar_type()),
                                   format);
}

Tensor squeeze_excite(const Tensor& x, const Tensor& w_reduce, const std::optional<Tensor>& b_reduce,
                      const Tensor& w_expand, const std::optional<Tensor>& b_expand, std::string_view activation,
                      std::string_view gate, std::string_view backend) {
  check_x(x);
  const auto format = memory_format_of(x);
  const Tensor reduce = torch::stable::contiguous(as_float(torch::stable::flatten(w_reduce, 1)));
  const Tensor expand = torch::stable::contiguous(as_float(torch::stable::flatten(w_expand, 1)));
  const auto float_bias = [](const std::optional<Tensor>& b) -> std::optional<Tensor> {
    return b.has_value() ? std::optional<Tensor>(torch::stable::contiguous(as_float(*b))) : std::nullopt;
  };
  if (use_cuda_kernels(x, backend)) {
    return mbkernels::squeeze_excite_cuda(torch::stable::contiguous(x, format), reduce, float_bias(b_reduce), expand,
                                          float_bias(b_expand), activation, gate);
  }
  const Tensor x32 = as_float(x);
  const std::optional<std::vector<int64_t>> plane{{2, 3}};
  const Tensor pooled = aten("aten::mean", "dim", x32, plane, false, std::optional<ScalarType>());
  const Tensor hidden =
      apply_activation(aten("aten::linear", "", pooled, reduce, float_bias(b_reduce)), activation, "squeeze_excite");
  const Tensor scale = apply_gate(aten("aten::linear", "", hidden, expand, float_bias(b_expand)), gate);
  const Tensor scaled = aten("aten::mul", "Tensor", x32, torch::stable::unsqueeze(torch::stable::unsqueeze(scale, -1), -1));
  return torch::stable::contiguous(torch::stable::to(scaled, x.scalar_type()), format);
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(mbkernels, m) {
  m.def(
      "dwconv_bn_act(Tensor x, Tensor weight, Tensor bias, SymInt[] stride, SymInt[] padding, SymInt[] dilation, "
      "str activation, str backend) -> Tensor");
  m.def(
      "squeeze_excite(Tensor x, Tensor w_reduce, Tensor? b_reduce, Tensor w_expand, Tensor? b_expand, "
      "str activation, str gate, str backend) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(mbkernels, CPU, m) {
  m.impl("dwconv_bn_act", TORCH_BOX(&dwconv_bn_act));
  m.impl("squeeze_excite", TORCH_BOX(&squeeze_excite));
}

STABLE_TORCH_LIBRARY_IMPL(mbkernels, CUDA, m) {
  m.impl("dwconv_bn_act", TORCH_BOX(&dwconv_bn_act));
  m.impl("squeeze_excite", TORCH_BOX(&squeeze_excite));
}
