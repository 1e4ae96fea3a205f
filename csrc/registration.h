// Registration of the attngate ops with torch's dispatcher, through the stable C API.
//
// Kernel files list their kernels with ATTNGATE_IMPL next to the code (a static table, no torch call at load time);
// register_ops() then defines every schema (csrc/ops.cpp) and registers the listed kernels, once per process. The
// Python module calls it from PyInit__C and the CMake library from a static initialiser, so a second library that
// registers the same namespace (the other build of the same sources) is detected instead of aborting the process.
#pragma once
#include <cstdint>
#include <string>

#include <torch/csrc/stable/library.h>

namespace attngate {

using BoxedKernel = void (*)(StableIValue*, uint64_t, uint64_t);

// Adds a kernel to the table that register_ops() registers (`key`: "CPU", "CUDA" or "CompositeExplicitAutograd").
struct KernelEntry {
  KernelEntry(const char* key, const char* op, BoxedKernel fn);
};

// Defines the schemas and registers every listed kernel. Returns "" on success, or why the ops could not be
// registered (another library in this process already registered the attngate namespace). `owner` names this
// library in torch's registration records (and so in the other library's error message).
std::string register_ops(const char* owner);

// The schemas, in csrc/ops.cpp.
extern const char* const kSchemas[];
extern const int kNumSchemas;

}  // namespace attngate

#define ATTNGATE_CONCAT_INNER(a, b) a##b
#define ATTNGATE_CONCAT(a, b) ATTNGATE_CONCAT_INNER(a, b)
// ATTNGATE_IMPL(CPU, gate_flags, gate_flags_cpu): registers gate_flags_cpu as the CPU kernel of attngate::gate_flags.
// init_priority(101), the first that programs may use: the table is complete before any default-priority static
// initialiser runs, such as the CMake library's call of register_ops() (the order of static initialisers across
// files is otherwise unspecified).
#define ATTNGATE_IMPL(key, op, fn)                                                        \
  static const ::attngate::KernelEntry ATTNGATE_CONCAT(attngate_kernel_entry_, __LINE__) \
      __attribute__((init_priority(101)))(#key, #op, TORCH_BOX(&fn))
