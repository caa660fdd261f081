// The native ops of the mbkernels:: namespace: their schemas and their CUDA / CPU (emulated) kernels.
// Linked into both the Python extension mbkernels._C and the CMake library for libtorch programs.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(mbkernels, m) {
  m.def(
      "dwconv_bn_act_cuda(Tensor x, Tensor weight, Tensor bias, int[2] stride, int[4] padding, "
      "int[2] dilation, str activation) -> Tensor");
  m.def(
      "squeeze_excite_cuda(Tensor x, Tensor w_reduce, Tensor? b_reduce, Tensor w_expand, Tensor? b_expand, "
      "str activation, str gate) -> Tensor");
}

// The same entry points serve both keys: on CPU tensors they run the kernels' host emulation.
TORCH_LIBRARY_IMPL(mbkernels, CUDA, m) {
  m.impl("dwconv_bn_act_cuda", &mbkernels::dwconv_bn_act_cuda);
  m.impl("squeeze_excite_cuda", &mbkernels::squeeze_excite_cuda);
}

TORCH_LIBRARY_IMPL(mbkernels, CPU, m) {
  m.impl("dwconv_bn_act_cuda", &mbkernels::dwconv_bn_act_cuda);
  m.impl("squeeze_excite_cuda", &mbkernels::squeeze_excite_cuda);
}
