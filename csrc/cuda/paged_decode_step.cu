// CUDA entry point of attngate::paged_decode_step_: one decode step of a gated layer in one call. The new token goes
// to the pages of the heads that keep it (the paged_append_kv_ kernels), into its window-ring slot (two row copies
// and the visibility flags), then the query attends over the pages and the valid ring rows (the paged decode
// attention kernels). No host synchronisation beyond the ops' optional status read-backs.

#include "cuda/cuda_utils.cuh"
#include "cuda/paged_attention_kernels.cuh"
#include "cuda/stable_cuda.cuh"
#include "paged_step.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

Tensor paged_decode_step_cuda(const Tensor& query, Tensor& key_pages, Tensor& value_pages, Tensor& page_table,
                              Tensor& lengths, Tensor& free_pages, Tensor& free_count, const Tensor& key,
                              const Tensor& value, const Tensor& keep, const std::optional<Tensor>& valid,
                              Tensor& ring_key, Tensor& ring_value, Tensor& ring_valid, int64_t slot, double scale,
                              const std::optional<Tensor>& ring_keep) {
  check_paged_decode_step_args(query, key_pages, value_pages, page_table, lengths, free_pages, free_count, key, value,
                               keep, valid, ring_key, ring_value, ring_valid, slot, scale, ring_keep);
  const cuda::DeviceGuard device_guard(query);
  append_step_rows(paged_append_kv_cuda, key_pages, value_pages, page_table, lengths, free_pages, free_count, key,
                   value, keep, ring_key, ring_value, ring_keep, slot);
  Tensor key_slot = torch::stable::select(ring_key, 2, slot);
  Tensor value_slot = torch::stable::select(ring_value, 2, slot);
  Tensor valid_slot = torch::stable::select(ring_valid, 2, slot);
  torch::stable::copy_(key_slot, key);
  torch::stable::copy_(value_slot, value);
  if (ring_keep.has_value()) {
    Tensor keep_slot = torch::stable::select(*ring_keep, 2, slot);
    if (valid.has_value()) {
      Tensor row_valid = torch::stable::unsqueeze(*valid, 1);
      torch::stable::copy_(valid_slot, row_valid);  // broadcast over the heads
      torch::stable::copy_(keep_slot, call_aten("aten::logical_and", "", keep, row_valid));
    } else {
      torch::stable::fill_(valid_slot, 1.0);
      torch::stable::copy_(keep_slot, keep);
    }
  } else {
    Tensor visible = call_aten("aten::logical_not", "", keep);
    if (valid.has_value()) visible = call_aten("aten::logical_and_", "", visible, torch::stable::unsqueeze(*valid, 1));
    torch::stable::copy_(valid_slot, visible);
  }
  Tensor out = empty_like_device(query.sizes(), query.scalar_type(), query);
  const Tensor scratch = cuda::make_status_scratch(key_pages, 0, 1);
  launch_paged_decode_attention(query, key_pages, value_pages, page_table, lengths, scale, ring_key, ring_value,
                                ring_valid, out, scratch.mutable_data_ptr<int32_t>());
  cuda::check_status("paged_decode_step_", scratch);
  return out;
}

}  // namespace

ATTNGATE_IMPL(CUDA, paged_decode_step_, paged_decode_step_cuda);

}  // namespace attngate
