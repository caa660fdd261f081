// The Python module mbkernels._C: importing it registers the ops (registration.cpp); its attributes tell
// what it was built for, so mbkernels can refuse a library built against another torch or CUDA.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "activations.cuh"
#include "ops.h"

namespace {

c10::ScalarType plan_dtype(const std::string& dtype) {
  if (dtype == "float32") return c10::ScalarType::Float;
  if (dtype == "float16") return c10::ScalarType::Half;
  if (dtype == "bfloat16") return c10::ScalarType::BFloat16;
  throw pybind11::value_error("dtype must be 'float32', 'float16' or 'bfloat16', got '" + dtype + "'");
}

// One dict per launch: kernel, grid (blocks), block (threads), shared_bytes.
pybind11::list plan_dicts(const std::vector<mbkernels::KernelLaunch>& plan) {
  pybind11::list launches;
  for (const auto& launch : plan) {
    pybind11::dict d;
    d["kernel"] = launch.kernel;
    d["grid"] = launch.blocks;
    d["block"] = launch.threads;
    d["shared_bytes"] = launch.shared_bytes;
    launches.append(d);
  }
  return launches;
}

}  // namespace

#ifndef MBKERNELS_TORCH_VERSION
#error "setup.py defines MBKERNELS_TORCH_VERSION, MBKERNELS_CUDA_VERSION and MBKERNELS_CUDA_ARCHS"
#endif

PYBIND11_MODULE(_C, m) {
  m.attr("TORCH_VERSION") = MBKERNELS_TORCH_VERSION;
  m.attr("CUDA_VERSION") = MBKERNELS_CUDA_VERSION;
  m.attr("CUDA_ARCHS") = MBKERNELS_CUDA_ARCHS;
  pybind11::tuple activations(mbkernels::kNumActivations);
  for (int i = 0; i < mbkernels::kNumActivations; ++i) activations[i] = mbkernels::kActivationNames[i];
  pybind11::tuple gates(mbkernels::kNumGates);
  for (int i = 0; i < mbkernels::kNumGates; ++i) gates[i] = mbkernels::kGateNames[i];
  m.attr("ACTIVATIONS") = activations;
  m.attr("GATES") = gates;
  pybind11::dict parameter_defaults;  // the activations that take a parameter, and its value when left out
  parameter_defaults[mbkernels::kActivationNames[static_cast<int>(mbkernels::Activation::LeakyReLU)]] =
      mbkernels::kDefaultLeakyReluSlope;
  m.attr("PARAMETER_DEFAULTS") = parameter_defaults;
  m.def(
      "dwconv_bn_act_limit_reason",
      [](int64_t N, int64_t C, int64_t H, int64_t W, bool channels_last, int64_t C_out, int64_t kh, int64_t kw,
         std::array<int64_t, 2> stride, std::array<int64_t, 4> padding, std::array<int64_t, 2> dilation) {
        return mbkernels::dwconv_bn_act_limit_reason({N, C, H, W, channels_last, C_out, kh, kw, stride, padding,
                                                      dilation});
      },
      "'' when dwconv_bn_act_cuda can run this case, else why not (padding: [top, bottom, left, right])",
      pybind11::arg("N"), pybind11::arg("C"), pybind11::arg("H"), pybind11::arg("W"),
      pybind11::arg("channels_last"), pybind11::arg("C_out"), pybind11::arg("kh"), pybind11::arg("kw"),
      pybind11::arg("stride"), pybind11::arg("padding"), pybind11::arg("dilation"));
  m.def("squeeze_excite_limit_reason", &mbkernels::squeeze_excite_limit_reason,
        "'' when squeeze_excite_cuda can run this case, else why not", pybind11::arg("N"), pybind11::arg("C"),
        pybind11::arg("H"), pybind11::arg("W"), pybind11::arg("channels_last"), pybind11::arg("R"));
  m.def(
      "dwconv_bn_act_launch_plan",
      [](int64_t N, int64_t C, int64_t H, int64_t W, bool channels_last, int64_t C_out, int64_t kh, int64_t kw,
         std::array<int64_t, 2> stride, std::array<int64_t, 4> padding, std::array<int64_t, 2> dilation,
         const std::string& dtype) {
        return plan_dicts(mbkernels::dwconv_bn_act_launch_plan(
            {N, C, H, W, channels_last, C_out, kh, kw, stride, padding, dilation}, plan_dtype(dtype)));
      },
      "The kernel launches dwconv_bn_act_cuda makes for this case, without launching: a list of dicts "
      "{kernel, grid, block, shared_bytes} (padding: [top, bottom, left, right]; dtype: 'float32', 'float16' or "
      "'bfloat16')",
      pybind11::arg("N"), pybind11::arg("C"), pybind11::arg("H"), pybind11::arg("W"),
      pybind11::arg("channels_last"), pybind11::arg("C_out"), pybind11::arg("kh"), pybind11::arg("kw"),
      pybind11::arg("stride"), pybind11::arg("padding"), pybind11::arg("dilation"), pybind11::arg("dtype"));
  m.def(
      "squeeze_excite_launch_plan",
      [](int64_t N, int64_t C, int64_t H, int64_t W, bool channels_last, int64_t R, const std::string& dtype) {
        return plan_dicts(mbkernels::squeeze_excite_launch_plan(N, C, H, W, channels_last, R, plan_dtype(dtype)));
      },
      "The kernel launches squeeze_excite_cuda makes for this case, without launching: a list of dicts "
      "{kernel, grid, block, shared_bytes}",
      pybind11::arg("N"), pybind11::arg("C"), pybind11::arg("H"), pybind11::arg("W"),
      pybind11::arg("channels_last"), pybind11::arg("R"), pybind11::arg("dtype"));
}
