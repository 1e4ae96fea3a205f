// The CPU storage kernels, one per op family, written against the layout of csrc/kv_tables.h so that the paged ops
// and the rectangle ops (append_kv_, compact_kv_) run the same code. Each validates every value first and raises,
// naming `op`, before anything is written; a rectangle reports "page table full" as its capacity overflow.
#pragma once
#include <optional>

#include "kv_tables.h"
#include "stable_api.h"

namespace attngate::cpu {

// Appends the kept rows of key/value (B, H, T, D) (keep (B, H, T), all when absent) after each head's rows; a
// paged cache pops the pages it needs from the free stack (cpu/paged_append_kv.cpp).
void append_rows(const char* op, const paged::Tables& t, Tensor& key_pages, Tensor& value_pages,
                 const paged::Pool& key_pool, const paged::Pool& value_pool, const Tensor& key, const Tensor& value,
                 const std::optional<Tensor>& keep);

// Stable in-place compaction with keep (B, H, L >= lengths); a paged cache pushes the pages that empty onto the free
// stack (cpu/paged_compact_kv.cpp).
void compact_rows(const char* op, const paged::Tables& t, Tensor& key_pages, Tensor& value_pages,
                  const paged::Pool& key_pool, const paged::Pool& value_pool, const Tensor& keep);

}  // namespace attngate::cpu

namespace attngate {

// The paged_append_kv_ op itself (argument checks included), for paged_decode_step_'s append.
void paged_append_kv_cpu(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                         Tensor& free_pages, Tensor& free_count, const Tensor& key, const Tensor& value,
                         const std::optional<Tensor>& keep);

}  // namespace attngate
