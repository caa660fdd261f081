// The native ops of the mbkernels:: namespace: their schemas and their CUDA / CPU (emulated) kernels, registered
// through PyTorch's stable ABI (STABLE_TORCH_LIBRARY: boxed kernels called with StableIValues), so that the
// library loads under every torch from the TORCH_TARGET_VERSION it is built for.
// Linked into both the Python extension mbkernels._C and the CMake library for libtorch programs.
// Each op's arguments are the fields of its bundle in mbkernels/_contract.py (DWConvArgs, SEArgs), in order and
// with their schema types: the cuda backend passes the bundle as it is, and tests/test_signatures.py holds the
// schemas to the bundles. The kernels take SymInt[] arguments as int lists (the stable ABI unpacks them; a
// symbolic int never reaches a real kernel).
#include <torch/csrc/stable/library.h>

#include "ops.h"

STABLE_TORCH_LIBRARY(mbkernels, m) {
  m.def(
      "dwconv_bn_act_cuda(Tensor x, Tensor weight, Tensor bias, SymInt[] stride, SymInt[] padding, "
      "SymInt[] dilation, str activation) -> Tensor");
  m.def(
      "squeeze_excite_cuda(Tensor x, Tensor w_reduce, Tensor? b_reduce, Tensor w_expand, Tensor? b_expand, "
      "str activation, str gate) -> Tensor");
}

// The same entry points serve both keys: on CPU tensors they run the kernels' host emulation.
STABLE_TORCH_LIBRARY_IMPL(mbkernels, CUDA, m) {
  m.impl("dwconv_bn_act_cuda", TORCH_BOX(&mbkernels::dwconv_bn_act_cuda));
  m.impl("squeeze_excite_cuda", TORCH_BOX(&mbkernels::squeeze_excite_cuda));
}

STABLE_TORCH_LIBRARY_IMPL(mbkernels, CPU, m) {
  m.impl("dwconv_bn_act_cuda", TORCH_BOX(&mbkernels::dwconv_bn_act_cuda));
  m.impl("squeeze_excite_cuda", TORCH_BOX(&mbkernels::squeeze_excite_cuda));
}
