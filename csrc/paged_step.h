// Shared by the CPU and CUDA entry points of attngate::paged_decode_step_ (one fused decode step: append if kept,
// write the window ring slot, attend): the argument checks (metadata only; messages name the argument) and the
// append of the new token through the paged_append_kv_ kernel of the same device.
#pragma once
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "overlap.h"
#include "paged_attention_checks.h"
#include "paged_checks.h"

namespace attngate {

inline void check_paged_decode_step_args(const at::Tensor& query, const at::Tensor& key_pages,
                                         const at::Tensor& value_pages, const at::Tensor& page_table,
                                         const at::Tensor& lengths, const at::Tensor& free_pages,
                                         const at::Tensor& free_count, const at::Tensor& key, const at::Tensor& value,
                                         const at::Tensor& keep, const std::optional<at::Tensor>& valid,
                                         const at::Tensor& ring_key, const at::Tensor& ring_value,
                                         const at::Tensor& ring_valid, int64_t slot, double scale) {
  check_paged_cache(key_pages, value_pages, page_table, lengths, /*writes=*/true);
  check_free_stack(key_pages, free_pages, free_count);
  const int64_t B = page_table.size(0), H = page_table.size(1);
  check_new_rows(key, "key", key_pages, page_table, /*rows_dim=*/false);
  check_new_rows(value, "value", key_pages, page_table, /*rows_dim=*/false);
  TORCH_CHECK(keep.scalar_type() == at::kBool, "keep must be bool, got ", keep.scalar_type());
  TORCH_CHECK(keep.dim() == 2 && keep.size(0) == B && keep.size(1) == H, "keep must have shape (B, H) = (", B, ", ",
              H, "), got ", keep.sizes());
  TORCH_CHECK(keep.device() == key_pages.device(), "keep must be on the same device as key_pages (",
              key_pages.device(), "), got ", keep.device());
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool, "valid must be bool, got ", valid->scalar_type());
    TORCH_CHECK(valid->dim() == 1 && valid->size(0) == B, "valid must have shape (B,) = (", B, ",), got ",
                valid->sizes());
    TORCH_CHECK(valid->device() == key_pages.device(), "valid must be on the same device as key_pages (",
                key_pages.device(), "), got ", valid->device());
  }
  // The ring is the attention's extra rows (B, H, W, D) with ring_valid (B, H, W): the decode checks cover it.
  check_paged_decode_attention_args(query, key_pages, value_pages, page_table, lengths, scale, ring_key, ring_value,
                                    ring_valid);
  const int64_t W = ring_key.size(2);
  TORCH_CHECK(0 <= slot && slot < W, "slot must lie in [0, W) with W = ring_key.size(2) = ", W, ", got ", slot);
  check_no_row_overlap(ring_key, "ring_key");
  check_no_row_overlap(ring_value, "ring_value");
  check_no_element_overlap(ring_valid, "ring_valid");
  check_no_shared_memory(ring_key, "ring_key", ring_value, "ring_value");
  check_no_shared_memory(ring_key, "ring_key", key_pages, "key_pages");
  check_no_shared_memory(ring_value, "ring_value", value_pages, "value_pages");
}

// Appends key/value (B, H, D) to the pages of the heads where keep (B, H): the paged_append_kv_ op (which checks the
// free stack and the page-table room before writing anything).
inline void append_new_token(at::Tensor& key_pages, at::Tensor& value_pages, at::Tensor& page_table,
                             at::Tensor& lengths, at::Tensor& free_pages, at::Tensor& free_count,
                             const at::Tensor& key, const at::Tensor& value, const at::Tensor& keep) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("attngate::paged_append_kv_", "")
                       .typed<void(at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  op.call(key_pages, value_pages, page_table, lengths, free_pages, free_count, key.unsqueeze(2), value.unsqueeze(2),
          std::optional<at::Tensor>(keep.unsqueeze(2)));
}

}  // namespace attngate
