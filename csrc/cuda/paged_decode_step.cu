// CUDA entry point of attngate::paged_decode_step_: one decode step of a gated layer in one call. The new token goes
// to the pages of the heads that keep it (the paged_append_kv_ kernels), into its window-ring slot (two row copies
// and the visibility flags), then the query attends over the pages and the valid ring rows (the paged decode
// attention kernels). No host synchronisation beyond the ops' optional status read-backs.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/cuda_utils.cuh"
#include "cuda/paged_attention_kernels.cuh"
#include "paged_step.h"

namespace attngate {
namespace {

at::Tensor paged_decode_step_cuda(const at::Tensor& query, at::Tensor& key_pages, at::Tensor& value_pages,
                                  at::Tensor& page_table, at::Tensor& lengths, at::Tensor& free_pages,
                                  at::Tensor& free_count, const at::Tensor& key, const at::Tensor& value,
                                  const at::Tensor& keep, const std::optional<at::Tensor>& valid,
                                  at::Tensor& ring_key, at::Tensor& ring_value, at::Tensor& ring_valid, int64_t slot,
                                  double scale) {
  check_paged_decode_step_args(query, key_pages, value_pages, page_table, lengths, free_pages, free_count, key, value,
                               keep, valid, ring_key, ring_value, ring_valid, slot, scale);
  const at::cuda::OptionalCUDAGuard device_guard(device_of(query));
  append_new_token(key_pages, value_pages, page_table, lengths, free_pages, free_count, key, value, keep);
  ring_key.select(2, slot).copy_(key);
  ring_value.select(2, slot).copy_(value);
  at::Tensor visible = keep.logical_not();
  if (valid.has_value()) visible.logical_and_(valid->unsqueeze(1));
  ring_valid.select(2, slot).copy_(visible);
  at::Tensor out = at::empty(query.sizes(), query.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor scratch = cuda::make_status_scratch(key_pages, 0, 1);
  launch_paged_decode_attention(query, key_pages, value_pages, page_table, lengths, scale, ring_key, ring_value,
                                ring_valid, out, scratch.data_ptr<int32_t>());
  cuda::check_status("paged_decode_step_", scratch);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(attngate, CUDA, m) { m.impl("paged_decode_step_", &paged_decode_step_cuda); }

}  // namespace attngate
