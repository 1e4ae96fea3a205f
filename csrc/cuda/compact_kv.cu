// CUDA entry point of attngate::compact_kv_ on a rectangle cache (B, H, C, D): a head with one page of C rows,
// run by the paged compaction kernels (cuda/paged_compact_kv.cu).
#include "checks.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/stable_cuda.cuh"
#include "cuda/storage_kernels.cuh"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

namespace pg = cuda::paged;

void compact_kv_cuda(Tensor& key_cache, Tensor& value_cache, Tensor& lengths, const Tensor& keep) {
  check_compact_kv_args(key_cache, value_cache, lengths, keep);
  const cuda::DeviceGuard device_guard(key_cache);
  const Tensor scratch = cuda::make_status_scratch(key_cache, 0, 1);
  enqueue_compact_kv_cuda(pg::make_rect_tables(key_cache, lengths), key_cache, value_cache,
                          pg::make_rect_pool(key_cache), pg::make_rect_pool(value_cache), keep, key_cache,
                          scratch.mutable_data_ptr<int32_t>());
  cuda::check_status("compact_kv_", scratch, rect_status);
}

}  // namespace

ATTNGATE_IMPL(CUDA, compact_kv_, compact_kv_cuda);

}  // namespace attngate
