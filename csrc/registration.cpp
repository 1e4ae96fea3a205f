#include "registration.h"

#include <dlfcn.h>

#include <mutex>
#include <vector>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/c/shim.h>

// Declared weak here (torch's header declares it only for targets >= 2.13): null when libtorch lacks it.
extern "C" __attribute__((weak)) const char* torch_exception_get_what_without_backtrace();

namespace attngate {
namespace {

struct Entry {
  const char* key;
  const char* op;
  BoxedKernel fn;
};

std::vector<Entry>& kernel_table() {
  static std::vector<Entry> table;
  return table;
}

std::string last_torch_error() {
  // The shim function that reads torch's last error message came with torch 2.13; the library targets 2.11, so it is
  // looked up weakly: present from 2.13 on, null in 2.11 and 2.12 (their message is then lost, the failure is not).
  if (torch_exception_get_what_without_backtrace == nullptr) return "(torch < 2.13 does not give the message)";
  const char* what = torch_exception_get_what_without_backtrace();
  return what != nullptr ? std::string(what) : std::string("unknown error");
}

// The path of the shared object holding this code (torch records it as the place of the registration).
std::string this_library_path() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<const void*>(&this_library_path), &info) != 0 && info.dli_fname != nullptr) {
    return info.dli_fname;
  }
  return "attngate";
}

// The library objects live as long as the process: deleting one would unregister its ops, and at exit the
// dispatcher may already be gone.
std::string register_once(const char* owner) {
  static const std::string path = this_library_path();
  TorchLibraryHandle def = nullptr;
  if (aoti_torch_library_init_def("attngate", path.c_str(), 0, &def) != AOTI_TORCH_SUCCESS) {
    return std::string(owner) + " cannot register the torch.ops.attngate operators: another library in this " +
           "process has registered them already. torch says: " + last_torch_error();
  }
  for (int i = 0; i < kNumSchemas; ++i) {
    if (aoti_torch_library_def(def, kSchemas[i]) != AOTI_TORCH_SUCCESS) {
      return std::string(owner) + ": defining " + kSchemas[i] + " failed: " + last_torch_error();
    }
  }
  std::vector<std::pair<std::string, TorchLibraryHandle>> impls;
  for (const Entry& e : kernel_table()) {
    TorchLibraryHandle lib = nullptr;
    for (const auto& [key, handle] : impls)
      if (key == e.key) lib = handle;
    if (lib == nullptr) {
      if (aoti_torch_library_init_impl("attngate", e.key, path.c_str(), 0, &lib) != AOTI_TORCH_SUCCESS) {
        return std::string(owner) + ": opening the " + e.key + " kernels failed: " + last_torch_error();
      }
      impls.emplace_back(e.key, lib);
    }
    if (torch_library_impl(lib, e.op, e.fn, TORCH_ABI_VERSION) != AOTI_TORCH_SUCCESS) {
      return std::string(owner) + ": registering the " + e.key + " kernel of " + e.op +
             " failed: " + last_torch_error();
    }
  }
  return "";
}

}  // namespace

KernelEntry::KernelEntry(const char* key, const char* op, BoxedKernel fn) { kernel_table().push_back({key, op, fn}); }

std::string register_ops(const char* owner) {
  static std::once_flag once;
  static std::string result;
  std::call_once(once, [&] { result = register_once(owner); });
  return result;
}

}  // namespace attngate
