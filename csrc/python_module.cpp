// The Python module mbkernels._C: importing it registers the ops (registration.cpp, public_ops.cpp); its
// attributes tell what it was built for and its functions give the launchers' limits and plans. Written against
// CPython's limited API (Py_LIMITED_API, set by the build) and no torch C++ header: one binary (an abi3 wheel)
// serves every CPython from the build's minimum on, as the stable ABI makes it serve every torch from
// TORCH_TARGET_VERSION on.
#include <Python.h>

#include <array>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "activations.cuh"
#include "ops.h"

#ifndef MBKERNELS_CUDA_VERSION
#error "the build defines MBKERNELS_TORCH_VERSION, MBKERNELS_CUDA_VERSION, MBKERNELS_CUDA_ARCHS and TORCH_TARGET_VERSION"
#endif

namespace {

// A new reference, owned: released when it goes out of scope unless handed on with release().
class Owned {
 public:
  explicit Owned(PyObject* object) : object_(object) {}
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() { Py_XDECREF(object_); }
  PyObject* get() const { return object_; }
  PyObject* release() {
    PyObject* object = object_;
    object_ = nullptr;
    return object;
  }

 private:
  PyObject* object_;
};

PyObject* to_python(const std::string& text) { return PyUnicode_FromStringAndSize(text.data(), text.size()); }

// A sequence of exactly N ints into `values`; false with a TypeError set otherwise (as a wrong argument type).
template <size_t N>
bool int_array(PyObject* sequence, const char* name, std::array<int64_t, N>& values) {
  if (!PySequence_Check(sequence) || PyUnicode_Check(sequence) || PySequence_Size(sequence) != Py_ssize_t(N)) {
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError, "%s must be a sequence of %d ints", name, int(N));
    return false;
  }
  for (size_t i = 0; i < N; ++i) {
    Owned item(PySequence_GetItem(sequence, Py_ssize_t(i)));
    if (item.get() == nullptr) return false;
    values[i] = PyLong_AsLongLong(item.get());
    if (values[i] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

// "float32" / "float16" / "bfloat16"; false with a ValueError set otherwise.
bool plan_dtype(const char* name, mbkernels::ScalarType& dtype) {
  const std::string text = name;
  if (text == "float32") dtype = mbkernels::ScalarType::Float;
  else if (text == "float16") dtype = mbkernels::ScalarType::Half;
  else if (text == "bfloat16") dtype = mbkernels::ScalarType::BFloat16;
  else {
    PyErr_Format(PyExc_ValueError, "dtype must be 'float32', 'float16' or 'bfloat16', got '%s'", name);
    return false;
  }
  return true;
}

// One dict per launch: kernel, grid (blocks), block (threads), shared_bytes.
PyObject* plan_list(const std::vector<mbkernels::KernelLaunch>& plan) {
  Owned launches(PyList_New(0));
  if (launches.get() == nullptr) return nullptr;
  for (const auto& launch : plan) {
    Owned d(PyDict_New());
    if (d.get() == nullptr) return nullptr;
    const std::pair<const char*, PyObject*> fields[] = {{"kernel", to_python(launch.kernel)},
                                                        {"grid", PyLong_FromLongLong(launch.blocks)},
                                                        {"block", PyLong_FromLong(launch.threads)},
                                                        {"shared_bytes", PyLong_FromLongLong(launch.shared_bytes)}};
    bool ok = true;
    for (const auto& [key, value] : fields) {
      Owned owned(value);
      ok = ok && value != nullptr && PyDict_SetItemString(d.get(), key, value) == 0;
    }
    if (!ok || PyList_Append(launches.get(), d.get()) != 0) return nullptr;
  }
  return launches.release();
}

// Runs `body`, a C++ call giving a new reference; its exception (the op's error) becomes a RuntimeError.
template <class Body>
PyObject* guarded(Body&& body) {
  try {
    return body();
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

struct DwconvCall {
  mbkernels::DwconvShape shape{};
  const char* dtype = nullptr;
};

// dwconv_bn_act_*(N, C, H, W, channels_last, C_out, kh, kw, stride, padding, dilation[, dtype]) -> the shape.
bool parse_dwconv(PyObject* args, PyObject* kwargs, bool with_dtype, DwconvCall& call) {
  // One name per format unit (CPython refuses more): the same list, with and without dtype.
  static const char* names[] = {"N",  "C",  "H",      "W",       "channels_last", "C_out", "kh",
                                "kw", "stride", "padding", "dilation", nullptr};
  static const char* names_with_dtype[] = {"N",  "C",  "H",      "W",       "channels_last", "C_out", "kh",
                                           "kw", "stride", "padding", "dilation", "dtype", nullptr};
  auto& s = call.shape;
  long long n, c, h, w, c_out, kh, kw;
  int channels_last;
  PyObject *stride, *padding, *dilation;
  const bool parsed =
      with_dtype ? PyArg_ParseTupleAndKeywords(args, kwargs, "LLLLpLLLOOOs", const_cast<char**>(names_with_dtype), &n, &c, &h, &w,
                                               &channels_last, &c_out, &kh, &kw, &stride, &padding, &dilation,
                                               &call.dtype)
                 : PyArg_ParseTupleAndKeywords(args, kwargs, "LLLLpLLLOOO", const_cast<char**>(names), &n, &c, &h, &w, &channels_last,
                                               &c_out, &kh, &kw, &stride, &padding, &dilation);
  if (!parsed) return false;
  s = {n, c, h, w, channels_last != 0, c_out, kh, kw, {}, {}, {}};
  return int_array(stride, "stride", s.stride) && int_array(padding, "padding", s.padding) &&
         int_array(dilation, "dilation", s.dilation);
}

PyObject* dwconv_bn_act_limit_reason(PyObject*, PyObject* args, PyObject* kwargs) {
  DwconvCall call;
  if (!parse_dwconv(args, kwargs, false, call)) return nullptr;
  return guarded([&] { return to_python(mbkernels::dwconv_bn_act_limit_reason(call.shape)); });
}

PyObject* dwconv_bn_act_launch_plan(PyObject*, PyObject* args, PyObject* kwargs) {
  DwconvCall call;
  mbkernels::ScalarType dtype;
  if (!parse_dwconv(args, kwargs, true, call) || !plan_dtype(call.dtype, dtype)) return nullptr;
  return guarded([&] { return plan_list(mbkernels::dwconv_bn_act_launch_plan(call.shape, dtype)); });
}

struct SeCall {
  long long n, c, h, w, r;
  int channels_last;
  const char* dtype = nullptr;
};

// squeeze_excite_*(N, C, H, W, channels_last, R[, dtype]).
bool parse_se(PyObject* args, PyObject* kwargs, bool with_dtype, SeCall& call) {
  static const char* names[] = {"N", "C", "H", "W", "channels_last", "R", nullptr};
  static const char* names_with_dtype[] = {"N", "C", "H", "W", "channels_last", "R", "dtype", nullptr};
  return with_dtype ? PyArg_ParseTupleAndKeywords(args, kwargs, "LLLLpLs", const_cast<char**>(names_with_dtype), &call.n, &call.c,
                                                  &call.h, &call.w, &call.channels_last, &call.r, &call.dtype)
                    : PyArg_ParseTupleAndKeywords(args, kwargs, "LLLLpL", const_cast<char**>(names), &call.n, &call.c, &call.h, &call.w,
                                                  &call.channels_last, &call.r);
}

PyObject* squeeze_excite_limit_reason(PyObject*, PyObject* args, PyObject* kwargs) {
  SeCall call;
  if (!parse_se(args, kwargs, false, call)) return nullptr;
  return guarded([&] {
    return to_python(
        mbkernels::squeeze_excite_limit_reason(call.n, call.c, call.h, call.w, call.channels_last != 0, call.r));
  });
}

PyObject* squeeze_excite_launch_plan(PyObject*, PyObject* args, PyObject* kwargs) {
  SeCall call;
  mbkernels::ScalarType dtype;
  if (!parse_se(args, kwargs, true, call) || !plan_dtype(call.dtype, dtype)) return nullptr;
  return guarded([&] {
    return plan_list(mbkernels::squeeze_excite_launch_plan(call.n, call.c, call.h, call.w, call.channels_last != 0,
                                                           call.r, dtype));
  });
}

PyMethodDef methods[] = {
    {"dwconv_bn_act_limit_reason", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(dwconv_bn_act_limit_reason)),
     METH_VARARGS | METH_KEYWORDS,
     "dwconv_bn_act_limit_reason(N, C, H, W, channels_last, C_out, kh, kw, stride, padding, dilation)\n"
     "'' when dwconv_bn_act_cuda can run this case, else why not (padding: [top, bottom, left, right])"},
    {"squeeze_excite_limit_reason", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(squeeze_excite_limit_reason)),
     METH_VARARGS | METH_KEYWORDS,
     "squeeze_excite_limit_reason(N, C, H, W, channels_last, R)\n"
     "'' when squeeze_excite_cuda can run this case, else why not"},
    {"dwconv_bn_act_launch_plan", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(dwconv_bn_act_launch_plan)),
     METH_VARARGS | METH_KEYWORDS,
     "dwconv_bn_act_launch_plan(N, C, H, W, channels_last, C_out, kh, kw, stride, padding, dilation, dtype)\n"
     "The kernel launches dwconv_bn_act_cuda makes for this case, without launching: a list of dicts "
     "{kernel, grid, block, shared_bytes} (padding: [top, bottom, left, right]; dtype: 'float32', 'float16' or "
     "'bfloat16')"},
    {"squeeze_excite_launch_plan", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(squeeze_excite_launch_plan)),
     METH_VARARGS | METH_KEYWORDS,
     "squeeze_excite_launch_plan(N, C, H, W, channels_last, R, dtype)\n"
     "The kernel launches squeeze_excite_cuda makes for this case, without launching: a list of dicts "
     "{kernel, grid, block, shared_bytes}"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mbkernels' CUDA kernels (see csrc/)", -1, methods};

// Sets module.name = value (a new reference, taken); false on an error.
bool add(PyObject* module, const char* name, PyObject* value) {
  if (value == nullptr) return false;
  if (PyModule_AddObject(module, name, value) != 0) {
    Py_DECREF(value);
    return false;
  }
  return true;
}

template <int N>
PyObject* name_tuple(const char* const (&names)[N]) {
  PyObject* tuple = PyTuple_New(N);
  for (int i = 0; tuple != nullptr && i < N; ++i) {
    PyObject* name = PyUnicode_FromString(names[i]);
    if (name == nullptr || PyTuple_SetItem(tuple, i, name) != 0) {
      Py_DECREF(tuple);
      return nullptr;
    }
  }
  return tuple;
}

// "2.10": the oldest torch the library's stable-ABI calls are for.
std::string target_torch() {
  const unsigned long long version = TORCH_TARGET_VERSION;
  return std::to_string(version >> 56) + "." + std::to_string((version >> 48) & 0xff);
}

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  Owned module(PyModule_Create(&module_def));
  if (module.get() == nullptr) return nullptr;
  PyObject* m = module.get();
  // The activations that take a parameter, and its value when left out.
  Owned parameter_defaults(PyDict_New());
  Owned slope(PyFloat_FromDouble(mbkernels::kDefaultLeakyReluSlope));
  if (parameter_defaults.get() == nullptr || slope.get() == nullptr ||
      PyDict_SetItemString(parameter_defaults.get(),
                           mbkernels::kActivationNames[static_cast<int>(mbkernels::Activation::LeakyReLU)],
                           slope.get()) != 0)
    return nullptr;
  const bool ok = add(m, "TORCH_VERSION", PyUnicode_FromString(MBKERNELS_TORCH_VERSION)) &&
                  add(m, "TORCH_TARGET_VERSION", to_python(target_torch())) &&
                  add(m, "CUDA_VERSION", PyUnicode_FromString(MBKERNELS_CUDA_VERSION)) &&
                  add(m, "CUDA_ARCHS", PyUnicode_FromString(MBKERNELS_CUDA_ARCHS)) &&
                  add(m, "ACTIVATIONS", name_tuple(mbkernels::kActivationNames)) &&
                  add(m, "GATES", name_tuple(mbkernels::kGateNames)) &&
                  add(m, "PARAMETER_DEFAULTS", parameter_defaults.release());
  return ok ? module.release() : nullptr;
}
