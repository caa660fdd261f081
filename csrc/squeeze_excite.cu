// PLACEHOLDER until the kernel lands: lets the extension link.
#include "ops.h"
#include <c10/util/Exception.h>
namespace mbkernels {
at::Tensor squeeze_excite_cuda(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view, c10::string_view) { TORCH_CHECK(false, "not implemented"); }
at::Tensor squeeze_excite_emulated(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view, c10::string_view) { TORCH_CHECK(false, "not implemented"); }
}
