// Per-device, per-kernel launch facts that cost a driver call to obtain: the occupancy of a (kernel, block
// size, dynamic shared memory) triple and the opt-in dynamic shared-memory limit already set on a kernel.
// Both are looked up once and remembered, so hot paths (one decode step) pay a mutex and a short scan.
#pragma once
#include <cstddef>
#include <mutex>
#include <vector>

#include <cuda_runtime.h>

#include "cuda/stable_cuda.cuh"

namespace attngate {
namespace cuda {

namespace detail {
struct LaunchFact {
  const void* kernel;
  int device, threads;
  size_t smem;
  int value;
};
inline std::mutex& launch_facts_mutex() {
  static std::mutex m;
  return m;
}
inline std::vector<LaunchFact>& launch_facts() {
  static std::vector<LaunchFact> facts;
  return facts;
}
// threads == 0 marks a "max dynamic shared memory set" fact, whose value is the bytes set.
inline bool find_fact(const void* kernel, int device, int threads, size_t smem, int& value) {
  for (const LaunchFact& f : launch_facts()) {
    if (f.kernel == kernel && f.device == device && f.threads == threads && (threads == 0 || f.smem == smem)) {
      value = f.value;
      return true;
    }
  }
  return false;
}
}  // namespace detail

// Raises the kernel's dynamic shared-memory limit on the current device to at least `smem` bytes (a no-op up
// to the default 48 KiB).
inline void ensure_dynamic_smem(const void* kernel, size_t smem) {
  if (smem <= 48 * 1024) return;
  const int device = cuda::current_device();
  std::lock_guard<std::mutex> lock(detail::launch_facts_mutex());
  int set = 0;
  if (detail::find_fact(kernel, device, 0, 0, set) && static_cast<size_t>(set) >= smem) return;
  STD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  for (detail::LaunchFact& f : detail::launch_facts()) {
    if (f.kernel == kernel && f.device == device && f.threads == 0) {
      f.value = static_cast<int>(smem);
      return;
    }
  }
  detail::launch_facts().push_back({kernel, device, 0, 0, static_cast<int>(smem)});
}

// Resident blocks per SM of `kernel` launched with `threads` threads and `smem` bytes of dynamic shared memory
// on the current device (cudaOccupancyMaxActiveBlocksPerMultiprocessor: registers, shared memory, block
// limits). Call ensure_dynamic_smem first when smem exceeds 48 KiB.
inline int blocks_per_sm(const void* kernel, int threads, size_t smem) {
  const int device = cuda::current_device();
  std::lock_guard<std::mutex> lock(detail::launch_facts_mutex());
  int value = 0;
  if (detail::find_fact(kernel, device, threads, smem, value)) return value;
  STD_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&value, kernel, threads, smem));
  detail::launch_facts().push_back({kernel, device, threads, smem, value});
  return value;
}

}  // namespace cuda
}  // namespace attngate
