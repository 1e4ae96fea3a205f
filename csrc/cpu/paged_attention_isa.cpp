// Compiles the paged attention tile kernels (paged_attention_vec.inc + paged_attention_tiles.inc) three times:
// AVX-512 and AVX2 inside target regions, so that the extension itself stays built for the baseline ISA, and a
// portable version; kernels() picks one at run time. All headers are included before the regions, so no inline
// function of the standard library or of torch is ever compiled with the wider instruction sets (their out-of-line
// copies would be shared with baseline code).
// GCC 12's AVX-512 headers self-initialise their "undefined" vectors (`__m512 __Y = __Y;`), which
// -Wmaybe-uninitialized reports at every inlined use (GCC bug 105593). The pragma must precede the first
// include of the intrinsics headers (torch headers may include them too); it only silences that one warning.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "cpu/paged_attention_isa.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include <torch/headeronly/util/Half.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ATTNGATE_PAGED_X86 1
#endif

namespace attngate::cpu::paged {

#if defined(ATTNGATE_PAGED_X86)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
namespace isa_avx512 {
#define ATTNGATE_PAGED_ISA 2
#define ATTNGATE_PAGED_ISA_NAME "avx512"
#include "cpu/paged_attention_vec.inc"
#include "cpu/paged_attention_tiles.inc"
#undef ATTNGATE_PAGED_ISA
#undef ATTNGATE_PAGED_ISA_NAME
}  // namespace isa_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace isa_avx2 {
#define ATTNGATE_PAGED_ISA 1
#define ATTNGATE_PAGED_ISA_NAME "avx2"
#include "cpu/paged_attention_vec.inc"
#include "cpu/paged_attention_tiles.inc"
#undef ATTNGATE_PAGED_ISA
#undef ATTNGATE_PAGED_ISA_NAME
}  // namespace isa_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // ATTNGATE_PAGED_X86

namespace isa_portable {
#define ATTNGATE_PAGED_ISA 0
#define ATTNGATE_PAGED_ISA_NAME "portable"
#include "cpu/paged_attention_vec.inc"
#include "cpu/paged_attention_tiles.inc"
#undef ATTNGATE_PAGED_ISA
#undef ATTNGATE_PAGED_ISA_NAME
}  // namespace isa_portable

namespace {

// ATTNGATE_CPU_ISA=avx2|portable caps the choice (tests run every variant on one machine this way).
const Kernels& pick() {
  const char* cap = std::getenv("ATTNGATE_CPU_ISA");
  const std::string want = cap != nullptr ? cap : "";
#if defined(ATTNGATE_PAGED_X86)
  __builtin_cpu_init();
  if ((want.empty() || want == "avx512") && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    return isa_avx512::kKernels;
  }
  if (want != "portable" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return isa_avx2::kKernels;
  }
#endif
  return isa_portable::kKernels;
}

}  // namespace

const Kernels& kernels() {
  static const Kernels& chosen = pick();
  return chosen;
}

}  // namespace attngate::cpu::paged
