// The Python module mbkernels._C: importing it registers the ops (registration.cpp); its attributes tell
// what it was built for, so mbkernels can refuse a library built against another torch or CUDA.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "activations.cuh"
#include "ops.h"

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
}
