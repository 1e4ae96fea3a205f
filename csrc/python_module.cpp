// `attngate_ext._C`: an empty Python module whose import registers the ops (register_ops). When another library in
// the process registered the attngate namespace first (the CMake build, libattngate_ops.so, loaded with
// torch.ops.load_library), the import raises ImportError with the reason instead of aborting. No pybind; Python's
// limited API only. Only setup.py builds this file; the CMake library has no Python dependency
// (csrc/library_init.cpp registers its ops).
#include <Python.h>

#include <string>

#include "registration.h"

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  const std::string error = attngate::register_ops("attngate_ext._C");
  if (!error.empty()) {
    PyErr_SetString(PyExc_ImportError, error.c_str());
    return nullptr;
  }
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}
