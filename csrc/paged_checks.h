// Argument checks shared by the paged ops (layout: attngate_ext/ops/paged.py). Metadata only (no device reads):
// shapes, dtypes, devices, contiguity and aliasing. Messages name the argument.
#pragma once

#include "stable_api.h"

namespace attngate {

// The pages, page table and lengths of one layer: key_pages/value_pages (P, S, D) float32/float16/bfloat16 with a
// contiguous last dim, page_table (B, H, M) int32, lengths (B, H) int32, all on one device. With `writes`, none may
// overlap itself or another (page_table and lengths are written by the storage ops).
void check_paged_cache(const Tensor& key_pages, const Tensor& value_pages, const Tensor& page_table,
                       const Tensor& lengths, bool writes);

// The free-page stack: free_pages (P) int32 and free_count (1) int32 on key_pages' device, both written in place.
void check_free_stack(const Tensor& key_pages, const Tensor& free_pages, const Tensor& free_count);

// New rows (B, H, T, D) (or (B, H, D) with `rows_dim` false) matching the cache: dtype, device, last-dim contiguity.
void check_new_rows(const Tensor& rows, const char* name, const Tensor& key_pages, const Tensor& page_table,
                    bool rows_dim);

}  // namespace attngate
