// Argument checks and their error messages, for the kernels' launchers, the public ops and the Python module.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/HeaderOnlyArrayRef.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace mbkernels {

// The pieces written one after another (operator<<): an error message.
template <class... Parts>
std::string message(const Parts&... parts) {
  std::ostringstream text;
  (text << ... << parts);
  return text.str();
}

// "[2, 8, 5, 5]": sizes or strides.
inline std::string list_text(torch::headeronly::IntHeaderOnlyArrayRef values) {
  std::string text = "[";
  for (size_t i = 0; i < values.size(); ++i) text += (i ? ", " : "") + std::to_string(values[i]);
  return text + "]";
}

// "cpu", "cuda:0": a tensor's device.
inline std::string device_text(const torch::stable::Tensor& t) {
  return t.is_cuda() ? "cuda:" + std::to_string(t.get_device_index()) : t.is_cpu() ? "cpu" : "another device";
}

}  // namespace mbkernels

// A failed check throws std::runtime_error with the message alone: torch passes it on to Python callers as a
// RuntimeError, to C++ callers as it is.
#define MBK_CHECK(cond, ...)                                                  \
  do {                                                                        \
    if (!(cond)) throw std::runtime_error(::mbkernels::message(__VA_ARGS__)); \
  } while (false)
