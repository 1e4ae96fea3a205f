// CUDA entry point of attngate::append_kv_ on a rectangle cache (B, H, C, D): a head with one page of C rows,
// run by the paged append kernels (cuda/paged_append_kv.cu), whose "page table full" is the capacity overflow here.
#include "checks.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/stable_cuda.cuh"
#include "cuda/storage_kernels.cuh"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

namespace pg = cuda::paged;

void append_kv_cuda(Tensor& key_cache, Tensor& value_cache, Tensor& lengths, const Tensor& key, const Tensor& value,
                    const std::optional<Tensor>& keep) {
  check_append_kv_args(key_cache, value_cache, lengths, key, value, keep);
  const cuda::DeviceGuard device_guard(key_cache);
  const Tensor scratch = cuda::make_status_scratch(key_cache, 0, 0);  // the plan always writes the status word
  enqueue_append_kv_cuda(pg::make_rect_tables(key_cache, lengths), key_cache, value_cache,
                         pg::make_rect_pool(key_cache), pg::make_rect_pool(value_cache), key, value, keep,
                         scratch.mutable_data_ptr<int32_t>(), /*gated=*/false);
  cuda::check_status("append_kv_", scratch, rect_status);
}

}  // namespace

ATTNGATE_IMPL(CUDA, append_kv_, append_kv_cuda);

}  // namespace attngate
