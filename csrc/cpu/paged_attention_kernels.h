// C++ entry points of the CPU paged attention kernels, for ops that fuse them with other work (e.g. a decode step
// that appends the new token, then attends). Arguments as in the op schemas (csrc/ops.cpp); layout in
// attngate_ext/ops/paged.py.
#pragma once
#include <optional>

#include "kv_tables.h"
#include "stable_api.h"

namespace attngate::cpu {

// Writes attention of query (B, Hq, D) over each KV head's rows (csrc/kv_tables.h: paged or a rectangle) plus the
// extra rows where extra_valid into `out` (B, Hq, D), contiguous, query's dtype. The arguments must have passed
// their op's checks; lengths and page ids are checked here (raises, naming `op`, before any work).
void decode_attention_out(const ::attngate::paged::Tables& t, const Tensor& key_pages, const Tensor& value_pages,
                          const ::attngate::paged::Pool& key_pool, const ::attngate::paged::Pool& value_pool,
                          const Tensor& query, double scale, double softcap, const std::optional<Tensor>& extra_key,
                          const std::optional<Tensor>& extra_value, const std::optional<Tensor>& extra_valid,
                          Tensor& out, const char* op);
// The same over the paged cache tensors.
void paged_decode_attention_out(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                const Tensor& page_table, const Tensor& lengths, double scale, double softcap,
                                const std::optional<Tensor>& extra_key, const std::optional<Tensor>& extra_value,
                                const std::optional<Tensor>& extra_valid, Tensor& out,
                                const char* op = "paged_decode_attention");

// The ops themselves (argument checks included).
Tensor paged_decode_attention_cpu(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                  const Tensor& page_table, const Tensor& lengths, double scale,
                                  const std::optional<Tensor>& extra_key, const std::optional<Tensor>& extra_value,
                                  const std::optional<Tensor>& extra_valid, double softcap);
Tensor paged_prefill_attention_cpu(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                   const Tensor& page_table, const Tensor& lengths, const Tensor& key,
                                   const Tensor& value, const Tensor& keep, const std::optional<Tensor>& valid,
                                   int64_t window, double scale, const std::optional<Tensor>& extra_key,
                                   const std::optional<Tensor>& extra_value, const std::optional<Tensor>& extra_until,
                                   double softcap);

}  // namespace attngate::cpu
