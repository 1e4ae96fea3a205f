// cp.async (sm_80+): 16-byte copies from global to shared memory that do not pass through registers, grouped
// and waited for per thread. On older architectures the same calls fall back to a synchronous 16-byte copy, so
// the kernels compile (and stay correct) for any TORCH_CUDA_ARCH_LIST.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace attngate {
namespace cuda {

// Starts copying 16 bytes from global `src` to shared `dst` (both 16-byte aligned).
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned smem = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(src) : "memory");
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

// Closes the group of copies this thread started since the previous commit (an empty group is fine).
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's most recent groups are still in flight. Other threads' copies
// are visible only after a following __syncthreads().
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

}  // namespace cuda
}  // namespace attngate
