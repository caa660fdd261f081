// Finds the mbkernels ops through the dispatcher of a plain libtorch program (no Python), prints their
// schemas, and checks each against an ATen float64 reference: on CPU tensors (the host emulation of the CUDA
// kernels) and, when a GPU is present, on CUDA tensors. Exit status 0 when every run op matched.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <functional>
#include <iostream>
#include <string>

namespace {

constexpr double kTolerance = 2e-5;  // float32, relative to the largest reference value

// The ops' schemas (csrc/registration.cpp) as the dispatcher's unboxed calls spell them.
using DwconvSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                   at::IntArrayRef, at::IntArrayRef, c10::string_view);
using SqueezeExciteSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                          const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                                          c10::string_view);

// Runs `run`, returns false on an error or a mismatch.
bool check(const std::string& what, const std::function<at::Tensor()>& run, const at::Tensor& reference) {
  at::Tensor out;
  try {
    out = run();
  } catch (const c10::Error& error) {
    const std::string message = error.what_without_backtrace();
    std::cout << "  " << what << ": FAILED: " << message << "\n";
    return false;
  }
  const at::Tensor got = out.to(at::kCPU, at::kDouble);
  const double scale = std::max(reference.abs().max().item<double>(), 1e-6);
  const double error = (got - reference).abs().max().item<double>() / scale;
  const bool ok = out.sizes() == reference.sizes() && !got.isnan().any().item<bool>() && error <= kTolerance;
  std::cout << "  " << what << ": " << (ok ? "ok" : "FAILED") << " (max error " << error
            << " of the largest value, shape " << out.sizes() << ")\n";
  return ok;
}

bool check_dwconv_bn_act(const c10::Device& device) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("mbkernels::dwconv_bn_act_cuda", "")
                .typed<DwconvSignature>();
  const int64_t channels = 5;
  const at::Tensor x = at::randn({2, channels, 9, 7});
  const at::Tensor weight = at::randn({channels, 1, 3, 3});
  const at::Tensor bias = at::randn({channels});
  const at::Tensor reference = at::hardswish(
      at::conv2d(x.to(at::kDouble), weight.to(at::kDouble), bias.to(at::kDouble), {2, 1}, {1, 1}, {1, 1}, channels));
  return check("dwconv_bn_act on " + device.str(), [&] {
    return op.call(x.to(device), weight.to(device), bias.to(device), {2, 1}, {1, 1, 1, 1}, {1, 1}, "hardswish");
  }, reference);
}

bool check_squeeze_excite(const c10::Device& device) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("mbkernels::squeeze_excite_cuda", "")
                .typed<SqueezeExciteSignature>();
  const int64_t channels = 6, reduced = 3;
  const at::Tensor x = at::randn({2, channels, 5, 3});
  const at::Tensor w_reduce = at::randn({reduced, channels});
  const at::Tensor b_reduce = at::randn({reduced});
  const at::Tensor w_expand = at::randn({channels, reduced});
  const at::Tensor b_expand = at::randn({channels});
  const at::Tensor x64 = x.to(at::kDouble);
  const at::Tensor pooled = x64.mean({2, 3});
  const at::Tensor hidden = at::relu(at::linear(pooled, w_reduce.to(at::kDouble), b_reduce.to(at::kDouble)));
  const at::Tensor scale = at::hardsigmoid(at::linear(hidden, w_expand.to(at::kDouble), b_expand.to(at::kDouble)));
  const at::Tensor reference = x64 * scale.unsqueeze(-1).unsqueeze(-1);
  return check("squeeze_excite on " + device.str(), [&] {
    return op.call(x.to(device), w_reduce.to(device), b_reduce.to(device), w_expand.to(device),
                   b_expand.to(device), "relu", "hardsigmoid");
  }, reference);
}

}  // namespace

int main() {
  at::manual_seed(0);
  std::cout << "mbkernels ops registered with the dispatcher:\n";
  for (const char* name : {"mbkernels::dwconv_bn_act_cuda", "mbkernels::squeeze_excite_cuda"}) {
    // Throws when the library was not loaded, i.e. the linker dropped it.
    std::cout << "  " << c10::Dispatcher::singleton().findSchemaOrThrow(name, "").schema() << "\n";
  }
  std::vector<c10::Device> devices = {c10::Device(at::kCPU)};
  if (at::hasCUDA()) {
    devices.emplace_back(at::kCUDA, 0);
  } else {
    std::cout << "no CUDA device: checking the CPU (host emulation) kernels only\n";
  }
  bool ok = true;
  for (const auto& device : devices) {
    ok = check_dwconv_bn_act(device) && ok;
    ok = check_squeeze_excite(device) && ok;
  }
  std::cout << (ok ? "all checks passed" : "SOME CHECKS FAILED") << "\n";
  return ok ? EXIT_SUCCESS : EXIT_FAILURE;
}
