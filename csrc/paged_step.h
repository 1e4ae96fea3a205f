// Shared by the CPU and CUDA entry points of attngate::paged_decode_step_ (one fused decode step: append if kept,
// write the window ring slot, attend): the argument checks (metadata only; messages name the argument) and the
// step's append (the new token, or with ring_keep the row leaving the ring slot) through the paged_append_kv_
// kernel of the same device (a direct call: no second trip through the dispatcher).
#pragma once
#include <cstdint>
#include <optional>
#include <utility>

#include "checks.h"
#include "overlap.h"
#include "paged_attention_checks.h"
#include "paged_checks.h"
#include "stable_api.h"

namespace attngate {

inline void check_paged_decode_step_args(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                         const Tensor& page_table, const Tensor& lengths, const Tensor& free_pages,
                                         const Tensor& free_count, const Tensor& key, const Tensor& value,
                                         const Tensor& keep, const std::optional<Tensor>& valid, const Tensor& ring_key,
                                         const Tensor& ring_value, const Tensor& ring_valid, int64_t slot,
                                         double scale, const std::optional<Tensor>& ring_keep, double softcap) {
  check_paged_cache(key_pages, value_pages, page_table, lengths, /*writes=*/true);
  check_free_stack(key_pages, free_pages, free_count);
  const int64_t B = page_table.size(0), H = page_table.size(1);
  check_new_rows(key, "key", key_pages, page_table, /*rows_dim=*/false);
  check_new_rows(value, "value", key_pages, page_table, /*rows_dim=*/false);
  AG_CHECK(keep.scalar_type() == kBool, "keep must be bool, got ", keep.scalar_type());
  AG_CHECK(keep.dim() == 2 && keep.size(0) == B && keep.size(1) == H, "keep must have shape (B, H) = (", B, ", ", H,
           "), got ", keep.sizes());
  check_same_device(keep, key_pages, "keep", "key_pages");
  if (valid.has_value()) {
    AG_CHECK(valid->scalar_type() == kBool, "valid must be bool, got ", valid->scalar_type());
    AG_CHECK(valid->dim() == 1 && valid->size(0) == B, "valid must have shape (B,) = (", B, ",), got ", valid->sizes());
    check_same_device(*valid, key_pages, "valid", "key_pages");
  }
  // The ring is the attention's extra rows (B, H, W, D) with ring_valid (B, H, W): the decode checks cover it.
  check_paged_decode_attention_args(query, key_pages, value_pages, page_table, lengths, scale, ring_key, ring_value,
                                    ring_valid, softcap);
  const int64_t W = ring_key.size(2);
  AG_CHECK(0 <= slot && slot < W, "slot must lie in [0, W) with W = ring_key.size(2) = ", W, ", got ", slot);
  check_no_row_overlap(ring_key, "ring_key");
  check_no_row_overlap(ring_value, "ring_value");
  check_no_element_overlap(ring_valid, "ring_valid");
  check_no_shared_memory(ring_key, "ring_key", ring_value, "ring_value");
  // The step writes the pools and the ring and reads the new token: no two of them may share memory.
  for (const auto& [t, name] : {std::pair{&ring_key, "ring_key"}, std::pair{&ring_value, "ring_value"},
                                std::pair{&key, "key"}, std::pair{&value, "value"}}) {
    check_no_shared_memory(*t, name, key_pages, "key_pages");
    check_no_shared_memory(*t, name, value_pages, "value_pages");
  }
  for (const auto& [ring, name] : {std::pair{&ring_key, "ring_key"}, std::pair{&ring_value, "ring_value"}}) {
    check_no_shared_memory(key, "key", *ring, name);
    check_no_shared_memory(value, "value", *ring, name);
  }
  if (ring_keep.has_value()) {
    AG_CHECK(ring_keep->scalar_type() == kBool, "ring_keep must be bool, got ", ring_keep->scalar_type());
    AG_CHECK(ring_keep->dim() == 3 && ring_keep->size(0) == B && ring_keep->size(1) == H && ring_keep->size(2) == W,
             "ring_keep must have shape (B, H, W) = (", B, ", ", H, ", ", W, "), got ", ring_keep->sizes());
    check_same_device(*ring_keep, key_pages, "ring_keep", "key_pages");
    check_no_element_overlap(*ring_keep, "ring_keep");
    check_no_shared_memory(*ring_keep, "ring_keep", ring_valid, "ring_valid");
  }
}

// The pages' part of a decode step, with `append(key_pages, value_pages, page_table, lengths, free_pages,
// free_count, key, value, keep)`, the device's paged_append_kv_ kernel (which checks the free stack and the
// page-table room before writing anything):
// * without ring_keep: the new token key/value (B, H, D) where keep (B, H);
// * with ring_keep: the row leaving ring slot `slot` (views of ring_key/ring_value/ring_keep; ring_keep is never set
//   where ring_valid is not) where it is kept, before the new token overwrites the slot.
template <typename AppendFn>
void append_step_rows(const AppendFn& append, Tensor& key_pages, Tensor& value_pages, Tensor& page_table,
                      Tensor& lengths, Tensor& free_pages, Tensor& free_count, Tensor key, Tensor value, Tensor keep,
                      Tensor ring_key, Tensor ring_value, const std::optional<Tensor>& ring_keep,
                      int64_t slot) {  // handles: copies are cheap
  if (ring_keep.has_value()) {
    Tensor flags = *ring_keep;
    append(key_pages, value_pages, page_table, lengths, free_pages, free_count,
           torch::stable::narrow(ring_key, 2, slot, 1), torch::stable::narrow(ring_value, 2, slot, 1),
           std::optional<Tensor>(torch::stable::narrow(flags, 2, slot, 1)));
  } else {
    append(key_pages, value_pages, page_table, lengths, free_pages, free_count, torch::stable::unsqueeze(key, 2),
           torch::stable::unsqueeze(value, 2), std::optional<Tensor>(torch::stable::unsqueeze(keep, 2)));
  }
}

}  // namespace attngate
