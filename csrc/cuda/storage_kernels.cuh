// The CUDA storage kernels as C++ functions, one per op family, written against the layout of csrc/kv_tables.h so
// that the paged ops and the rectangle ops (append_kv_, compact_kv_) launch the same kernels; and the row copy
// they share. The enqueue functions launch on the current stream and OR their value errors into *status (device
// int32), which the caller reads back once (cuda::check_status; a rectangle translates it with rect_status).
#pragma once
#include <cstdint>
#include <optional>

#include "cuda/paged_storage.cuh"
#include "stable_api.h"

namespace attngate {

// Appends the kept rows of key/value (B, H, T, D) after each head's rows (cuda/paged_append_kv.cu). With `gated`
// the status word may already be set by the caller's earlier kernels, and then nothing is written; without, the
// plan writes it whatever it held.
void enqueue_append_kv_cuda(const cuda::paged::Tables& t, Tensor& key_pages, Tensor& value_pages,
                            const cuda::paged::Pool& key_pool, const cuda::paged::Pool& value_pool, const Tensor& key,
                            const Tensor& value, const std::optional<Tensor>& keep, int32_t* status, bool gated);

// enqueue_append_kv_cuda on the paged tensors, gated (paged_decode_step_'s append).
void enqueue_paged_append_kv_cuda(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                                  Tensor& free_pages, Tensor& free_count, const Tensor& key, const Tensor& value,
                                  const std::optional<Tensor>& keep, int32_t* status);

// Stable in-place compaction with keep (B, H, L) (cuda/paged_compact_kv.cu); `status` is zeroed by the caller's
// make_status_scratch(..., 1).
void enqueue_compact_kv_cuda(const cuda::paged::Tables& t, Tensor& key_pages, Tensor& value_pages,
                             const cuda::paged::Pool& key_pool, const cuda::paged::Pool& value_pool, const Tensor& keep,
                             const Tensor& scratch_like, int32_t* status);

namespace cuda {

// Copies units [first, units) of kN elements of one key row and one value row, threads strided by `step`.
template <typename T, int kN>
__device__ __forceinline__ void copy_row_units(T* __restrict__ kdst, T* __restrict__ vdst, const T* __restrict__ ksrc,
                                               const T* __restrict__ vsrc, int64_t first, int64_t units, int step) {
  // Not unrolled: an unrolled copy of 64-bit-indexed vectors made ptxas spill in the wide compaction kernel.
#pragma unroll 1
  for (int64_t u = first; u < units; u += step) {
    copy_elems<T, kN>(kdst + u * kN, ksrc + u * kN);
    copy_elems<T, kN>(vdst + u * kN, vsrc + u * kN);
  }
}

}  // namespace cuda
}  // namespace attngate
