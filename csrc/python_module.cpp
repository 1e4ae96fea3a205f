// `attngate_ext._C` is an empty Python module: importing it loads this shared library, whose static
// initialisers register the ops with the dispatcher. No pybind. Only setup.py builds this file; the CMake
// library (for C++ users and torch.ops.load_library) has no Python dependency.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}
