// Host entry points of the CUDA paged attention kernels, for ops that fuse them with other work (e.g. a decode step
// that appends the new token, then attends, with one status word for both). Arguments as in the op schemas
// (csrc/ops.cpp); layout in attngate_ext/ops/paged.py.
#pragma once
#include <cstdint>
#include <optional>

#include "stable_api.h"

namespace attngate {

// Enqueues paged decode attention on the current stream: query (B, Hq, D) over each KV head's paged rows plus the
// extra rows where extra_valid, into `out` (B, Hq, D) contiguous, query's dtype. Arguments must have passed
// check_paged_decode_attention_args and be on the current device. No host synchronisation: lengths outside
// [0, M * page_size] and page ids outside [0, P) are ORed into *status (device int32) as kStatusLengthOutOfRange /
// kStatusBadPageId, and the reads stay in bounds (such rows are skipped).
void launch_paged_decode_attention(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                   const Tensor& page_table, const Tensor& lengths, double scale,
                                   const std::optional<Tensor>& extra_key, const std::optional<Tensor>& extra_value,
                                   const std::optional<Tensor>& extra_valid, Tensor& out, int32_t* status);

}  // namespace attngate
