// The Python module mbkernels._C: importing it registers the ops (registration.cpp); its attributes tell
// what it was built for, so mbkernels can refuse a library built against another torch or CUDA.
#include <Python.h>
#include <pybind11/pybind11.h>

#include "activations.cuh"

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
}
