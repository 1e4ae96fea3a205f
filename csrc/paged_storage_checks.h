// Argument checks of the paged storage ops (paged_append_kv_, paged_compact_kv_, paged_remove_rows_), shared by
// the CPU and CUDA entry points. Metadata only (no device reads); messages name the argument. The value checks
// (lengths, free_count, page ids, rows) happen in the kernels, before any write.
#pragma once
#include <cstdint>
#include <limits>
#include <optional>

#include "checks.h"
#include "overlap.h"
#include "paged_checks.h"
#include "stable_api.h"

namespace attngate {

// A per-head mask or index tensor (B, H, N) of `dtype` (named dtype_name) on key_pages' device.
inline void check_paged_head_tensor(const Tensor& t, const char* name, const char* shape, ScalarType dtype,
                                    const char* dtype_name, const Tensor& key_pages, const Tensor& page_table) {
  AG_CHECK(t.scalar_type() == dtype, name, " must be ", dtype_name, ", got ", t.scalar_type());
  AG_CHECK(t.dim() == 3 && t.size(0) == page_table.size(0) && t.size(1) == page_table.size(1), name,
           " must have shape ", shape, " with (B, H) = (", page_table.size(0), ", ", page_table.size(1), "), got ",
           t.sizes());
  check_same_device(t, key_pages, name, "key_pages");
}

// The state every storage op reads and writes: pages, page table, lengths and the free stack. The page table and
// lengths must not share memory with the free stack either (all four are written).
inline void check_paged_storage_state(const Tensor& key_pages, const Tensor& value_pages, const Tensor& page_table,
                                      const Tensor& lengths, const Tensor& free_pages, const Tensor& free_count) {
  check_paged_cache(key_pages, value_pages, page_table, lengths, /*writes=*/true);
  check_free_stack(key_pages, free_pages, free_count);
  check_no_shared_memory(torch::stable::unsqueeze(page_table, -1), "page_table", free_pages, "free_pages",
                         /*b_rows=*/false);
  check_no_shared_memory(torch::stable::unsqueeze(page_table, -1), "page_table", free_count, "free_count",
                         /*b_rows=*/false);
  check_no_shared_memory(torch::stable::unsqueeze(lengths, -1), "lengths", free_pages, "free_pages", /*b_rows=*/false);
  check_no_shared_memory(torch::stable::unsqueeze(lengths, -1), "lengths", free_count, "free_count", /*b_rows=*/false);
}

inline void check_paged_append_args(const Tensor& key_pages, const Tensor& value_pages, const Tensor& page_table,
                                    const Tensor& lengths, const Tensor& free_pages, const Tensor& free_count,
                                    const Tensor& key, const Tensor& value, const std::optional<Tensor>& keep) {
  check_paged_storage_state(key_pages, value_pages, page_table, lengths, free_pages, free_count);
  check_new_rows(key, "key", key_pages, page_table, /*rows_dim=*/true);
  check_new_rows(value, "value", key_pages, page_table, /*rows_dim=*/true);
  AG_CHECK(same_shape(value, key), "value must have the shape of key ", key.sizes(), ", got ", value.sizes());
  AG_CHECK(key.size(2) <= std::numeric_limits<int32_t>::max(), "key must have T < 2^31, got ", key.size(2));
  if (keep.has_value()) {
    check_paged_head_tensor(*keep, "keep", "(B, H, T)", kBool, "bool", key_pages, page_table);
    AG_CHECK(keep->size(2) == key.size(2), "keep must have shape (B, H, T) with T = ", key.size(2), ", got ",
             keep->sizes());
  }
  // The new rows are read while the pools are written: they must not alias.
  check_no_shared_memory(key, "key", key_pages, "key_pages");
  check_no_shared_memory(key, "key", value_pages, "value_pages");
  check_no_shared_memory(value, "value", key_pages, "key_pages");
  check_no_shared_memory(value, "value", value_pages, "value_pages");
}

inline void check_paged_compact_args(const Tensor& key_pages, const Tensor& value_pages, const Tensor& page_table,
                                     const Tensor& lengths, const Tensor& free_pages, const Tensor& free_count,
                                     const Tensor& keep) {
  check_paged_storage_state(key_pages, value_pages, page_table, lengths, free_pages, free_count);
  check_paged_head_tensor(keep, "keep", "(B, H, L)", kBool, "bool", key_pages, page_table);
}

inline void check_paged_remove_args(const Tensor& key_pages, const Tensor& value_pages, const Tensor& page_table,
                                    const Tensor& lengths, const Tensor& free_pages, const Tensor& free_count,
                                    const Tensor& rows) {
  check_paged_storage_state(key_pages, value_pages, page_table, lengths, free_pages, free_count);
  check_paged_head_tensor(rows, "rows", "(B, H, K)", kInt, "int32", key_pages, page_table);
}

}  // namespace attngate
