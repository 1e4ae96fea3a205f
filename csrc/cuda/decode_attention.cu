// CUDA entry point of attngate::decode_attention on a rectangle cache (B, H, C, D): a head with one page of C rows,
// run by the paged decode attention kernels (cuda/paged_decode_attention.cu) without extra rows.
#include "checks.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/paged_attention_kernels.cuh"
#include "cuda/stable_cuda.cuh"
#include "kv_tables.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

Tensor decode_attention_cuda(const Tensor& query, const Tensor& key_cache, const Tensor& value_cache,
                             const Tensor& lengths, double scale, double softcap) {
  check_decode_attention_args(query, key_cache, value_cache, lengths, scale, softcap);
  Tensor out = empty_like_device(query.sizes(), query.scalar_type(), query);
  if (out.numel() == 0) return out;
  const cuda::DeviceGuard device_guard(query);
  const Tensor scratch = cuda::make_status_scratch(key_cache, 0, 1);
  launch_decode_attention(query, paged::make_rect_tables(key_cache, lengths), key_cache, value_cache,
                          paged::make_rect_pool(key_cache), paged::make_rect_pool(value_cache), scale, softcap, std::nullopt,
                          std::nullopt, std::nullopt, out, scratch.mutable_data_ptr<int32_t>());
  cuda::check_status("decode_attention", scratch);
  return out;
}

}  // namespace

ATTNGATE_IMPL(CUDA, decode_attention, decode_attention_cuda);

}  // namespace attngate
