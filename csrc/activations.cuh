// The activation and gate math shared by every CUDA kernel, their host emulation and the public ops' CPU
// kernels (public_ops.cpp). The table is mbkernels/activations.py's: mbkernels._C exposes these names (in their
// code order) and parameter defaults as ACTIVATIONS / GATES / PARAMETER_DEFAULTS, and tests/test_cuda_kernels.py
// holds them, the parser and the math to that module.
#pragma once

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <string>
#include <string_view>

#include "checks.h"

#if defined(__CUDACC__)
#define MBK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MBK_HOST_DEVICE inline
#endif

namespace mbkernels {

enum class Activation : int {
  Identity = 0,
  ReLU = 1,
  ReLU6 = 2,
  HardSwish = 3,
  SiLU = 4,
  GELU = 5,      // erf form, as torch's F.gelu
  GELUTanh = 6,  // F.gelu(approximate="tanh")
  LeakyReLU = 7  // param: the negative slope
};
enum class Gate : int { Sigmoid = 0, HardSigmoid = 1 };

inline constexpr const char* kActivationNames[] = {"identity", "relu",  "relu6",     "hardswish",
                                                   "silu",     "gelu",  "gelu_tanh", "leaky_relu"};
inline constexpr const char* kGateNames[] = {"sigmoid", "hardsigmoid"};
inline constexpr int kNumActivations = sizeof(kActivationNames) / sizeof(kActivationNames[0]);
inline constexpr int kNumGates = sizeof(kGateNames) / sizeof(kGateNames[0]);
inline constexpr float kDefaultLeakyReluSlope = 0.01f;  // torch's default

// "a, b, c": a table's names, for error messages.
template <int N>
inline std::string name_list(const char* const (&names)[N]) {
  std::string list = names[0];
  for (int i = 1; i < N; ++i) list = list + ", " + names[i];
  return list;
}

// An activation with its parameter (only leaky_relu has one).
struct ActivationSpec {
  Activation kind;
  float param;
};

// "name" or "name:param" -> the spec; an MBK_CHECK error naming `op` and the text otherwise.
inline ActivationSpec parse_activation(std::string_view text, const char* op) {
  const size_t colon = text.find(':');
  const std::string_view name = text.substr(0, colon);
  int code = -1;
  for (int i = 0; i < kNumActivations; ++i)
    if (name == kActivationNames[i]) code = i;
  MBK_CHECK(code >= 0, op, ": unknown activation '", text, "'; expected one of ", name_list(kActivationNames));
  const Activation kind = static_cast<Activation>(code);
  ActivationSpec spec{kind, kind == Activation::LeakyReLU ? kDefaultLeakyReluSlope : 0.f};
  if (colon == std::string_view::npos) return spec;
  MBK_CHECK(spec.kind == Activation::LeakyReLU, op, ": activation '", text, "': ", name, " takes no parameter");
  const std::string param(text.substr(colon + 1));
  char* end = nullptr;
  errno = 0;
  spec.param = std::strtof(param.c_str(), &end);
  MBK_CHECK(!param.empty() && end == param.c_str() + param.size() && errno == 0 && std::isfinite(spec.param), op,
              ": activation '", text, "': the parameter must be a finite number");
  return spec;
}

// -1 when the name is unknown.
inline int gate_index(std::string_view name) {
  for (int i = 0; i < kNumGates; ++i)
    if (name == kGateNames[i]) return i;
  return -1;
}

// NaN-propagating clamp (fmaxf/fminf return the other operand for a NaN; stock torch propagates NaN).
MBK_HOST_DEVICE float clamp_propagating_nan(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

MBK_HOST_DEVICE float apply_activation(float v, ActivationSpec activation) {
  switch (activation.kind) {
    case Activation::ReLU:
      return v < 0.f ? 0.f : v;
    case Activation::ReLU6:
      return clamp_propagating_nan(v, 0.f, 6.f);
    case Activation::HardSwish:
      return v * clamp_propagating_nan(v + 3.f, 0.f, 6.f) * (1.f / 6.f);
    case Activation::SiLU:
      return v / (1.f + expf(-v));
    case Activation::GELU:
      return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case Activation::GELUTanh:
      return 0.5f * v * (1.f + tanhf(0.79788456080286536f * fmaf(0.044715f * v, v * v, v)));
    case Activation::LeakyReLU:
      return v < 0.f ? v * activation.param : v;
    case Activation::Identity:
    default:
      return v;
  }
}

// apply_activation on N values with one switch around the loops, not N switches: the compiler keeps one
// activation's code live at a time (N inlined switches cost registers in the kernels' epilogues).
template <int N>
MBK_HOST_DEVICE void apply_activation(float (&values)[N], ActivationSpec activation) {
  switch (activation.kind) {
#define MBK_ACTIVATION_CASE(kind)                                                         \
  case Activation::kind:                                                                  \
    for (int i = 0; i < N; ++i) values[i] = apply_activation(values[i], {Activation::kind, activation.param}); \
    return;
    MBK_ACTIVATION_CASE(ReLU)
    MBK_ACTIVATION_CASE(ReLU6)
    MBK_ACTIVATION_CASE(HardSwish)
    MBK_ACTIVATION_CASE(SiLU)
    MBK_ACTIVATION_CASE(GELU)
    MBK_ACTIVATION_CASE(GELUTanh)
    MBK_ACTIVATION_CASE(LeakyReLU)
#undef MBK_ACTIVATION_CASE
    case Activation::Identity:
    default:
      return;
  }
}

MBK_HOST_DEVICE float apply_gate(float v, Gate gate) {
  if (gate == Gate::HardSigmoid) return clamp_propagating_nan(v + 3.f, 0.f, 6.f) * (1.f / 6.f);
  return 1.f / (1.f + expf(-v));
}

}  // namespace mbkernels
