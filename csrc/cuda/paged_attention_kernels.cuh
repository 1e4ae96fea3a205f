// Host entry points of the CUDA decode attention kernels (cuda/paged_decode_attention.cu), for ops that fuse them
// with other work (a decode step that appends the new token, then attends, with one status word for both) and for
// the rectangle op decode_attention. Arguments as in the op schemas (csrc/ops.cpp).
#pragma once
#include <cstdint>
#include <optional>

#include "kv_tables.h"
#include "stable_api.h"

namespace attngate {

// Enqueues decode attention on the current stream: query (B, Hq, D) over each KV head's rows (csrc/kv_tables.h:
// paged pools or a rectangle cache) plus the extra rows where extra_valid, into `out` (B, Hq, D) contiguous, query's
// dtype. Arguments must have passed their op's checks and be on the current device. No host synchronisation:
// lengths outside [0, capacity] and page ids outside [0, P) are ORed into *status (device int32) as
// kStatusLengthOutOfRange / kStatusBadPageId, and the reads stay in bounds (such rows are skipped).
void launch_decode_attention(const Tensor& query, const paged::Tables& t, const Tensor& key_pages,
                             const Tensor& value_pages, const paged::Pool& key_pool, const paged::Pool& value_pool,
                             double scale, double softcap, const std::optional<Tensor>& extra_key,
                             const std::optional<Tensor>& extra_value, const std::optional<Tensor>& extra_valid,
                             Tensor& out, int32_t* status);

// The same over the paged cache tensors.
void launch_paged_decode_attention(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                   const Tensor& page_table, const Tensor& lengths, double scale, double softcap,
                                   const std::optional<Tensor>& extra_key, const std::optional<Tensor>& extra_value,
                                   const std::optional<Tensor>& extra_valid, Tensor& out, int32_t* status);

}  // namespace attngate
