// The activation and gate math shared by every CUDA kernel and by their host emulation.
// The names and their order match mbkernels/activations.py (a test compares them through mbkernels._C).
#pragma once

#include <cmath>
#include <string_view>

#if defined(__CUDACC__)
#define MBK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MBK_HOST_DEVICE inline
#endif

namespace mbkernels {

enum class Activation : int { Identity = 0, ReLU = 1, ReLU6 = 2, HardSwish = 3, SiLU = 4 };
enum class Gate : int { Sigmoid = 0, HardSigmoid = 1 };

inline constexpr const char* kActivationNames[] = {"identity", "relu", "relu6", "hardswish", "silu"};
inline constexpr const char* kGateNames[] = {"sigmoid", "hardsigmoid"};
inline constexpr int kNumActivations = 5;
inline constexpr int kNumGates = 2;

// -1 when the name is unknown.
inline int activation_index(std::string_view name) {
  for (int i = 0; i < kNumActivations; ++i)
    if (name == kActivationNames[i]) return i;
  return -1;
}

inline int gate_index(std::string_view name) {
  for (int i = 0; i < kNumGates; ++i)
    if (name == kGateNames[i]) return i;
  return -1;
}

// NaN-propagating clamp (fmaxf/fminf return the other operand for a NaN; stock torch propagates NaN).
MBK_HOST_DEVICE float clamp_propagating_nan(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

MBK_HOST_DEVICE float apply_activation(float v, Activation activation) {
  switch (activation) {
    case Activation::ReLU:
      return v < 0.f ? 0.f : v;
    case Activation::ReLU6:
      return clamp_propagating_nan(v, 0.f, 6.f);
    case Activation::HardSwish:
      return v * clamp_propagating_nan(v + 3.f, 0.f, 6.f) * (1.f / 6.f);
    case Activation::SiLU:
      return v / (1.f + expf(-v));
    case Activation::Identity:
    default:
      return v;
  }
}

MBK_HOST_DEVICE float apply_gate(float v, Gate gate) {
  if (gate == Gate::HardSigmoid) return clamp_propagating_nan(v + 3.f, 0.f, 6.f) * (1.f / 6.f);
  return 1.f / (1.f + expf(-v));
}

}  // namespace mbkernels
