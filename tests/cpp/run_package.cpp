// Runs an AOTInductor package (.pt2) of a patched model without Python: loads it with AOTInductor's C++ loader,
// runs it on an input saved by Python, and compares the output with the stock model's, saved beside it. The
// package calls the mbkernels ops, which libmbkernels registers (csrc/public_ops.cpp) when the program loads it.
//
//   run_package PACKAGE.pt2 TENSORS.bin     TENSORS.bin: the input and the expected output, from make_package.py
// Exit status 0 when the output matches within float32 tolerance.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <vector>

namespace {

constexpr double kTolerance = 1e-4;  // float32 against the float64 stock model, relative to the largest logit

// Tensors as make_package.py writes them: int64 rank, int64 sizes, float64 values, one after the other.
std::vector<at::Tensor> load_tensors(const char* path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file, "cannot open ", path);
  std::vector<at::Tensor> tensors;
  int64_t rank = 0;
  while (file.read(reinterpret_cast<char*>(&rank), sizeof rank)) {
    std::vector<int64_t> sizes(rank);
    file.read(reinterpret_cast<char*>(sizes.data()), rank * sizeof(int64_t));
    at::Tensor t = at::empty(sizes, at::kDouble);
    file.read(reinterpret_cast<char*>(t.data_ptr<double>()), t.numel() * sizeof(double));
    TORCH_CHECK(file, path, " ends inside a tensor");
    tensors.push_back(t);
  }
  return tensors;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: run_package PACKAGE.pt2 TENSORS.bin\n";
    return 2;
  }
  for (const char* name : {"mbkernels::dwconv_bn_act", "mbkernels::squeeze_excite"}) {
    // Throws when libmbkernels was not loaded (the linker dropped it): the package could not run its ops.
    std::cout << "registered: " << c10::Dispatcher::singleton().findSchemaOrThrow(name, "").schema() << "\n";
  }
  const auto tensors = load_tensors(argv[2]);
  const at::Tensor x = tensors.at(0).to(at::kFloat);
  const at::Tensor expected = tensors.at(1).to(at::kDouble);
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  const at::Tensor out = loader.run({x}).at(0).to(at::kCPU, at::kDouble);
  const double scale = std::max(expected.abs().max().item<double>(), 1e-6);
  const double error = (out - expected).abs().max().item<double>() / scale;
  const bool ok = out.sizes() == expected.sizes() && !out.isnan().any().item<bool>() && error <= kTolerance;
  std::cout << "package " << argv[1] << ": output " << out.sizes() << ", max error " << error
            << " of the largest logit: " << (ok ? "ok" : "FAILED") << "\n";
  return ok ? EXIT_SUCCESS : EXIT_FAILURE;
}
