// Argument checks of paged_decode_attention and paged_prefill_attention, shared by the CPU and CUDA entry points
// (metadata only: shapes, dtypes, devices, contiguity; no device reads). Messages name the argument. Value checks
// (lengths in [0, M * page_size], page ids in [0, P)) happen in the kernels and are reported with StatusBits.
#pragma once
#include <cstdint>
#include <optional>
#include <vector>

#include "kv_tables.h"
#include "stable_api.h"

namespace attngate {

// query (B, Hq, D), the paged cache (check_paged_cache), scale finite, softcap >= 0, and the optional extra rows
// extra_key/extra_value (B, H, E, D) with extra_valid (B, H, E) bool.
void check_paged_decode_attention_args(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                       const Tensor& page_table, const Tensor& lengths, double scale,
                                       const std::optional<Tensor>& extra_key, const std::optional<Tensor>& extra_value,
                                       const std::optional<Tensor>& extra_valid, double softcap);

// query (B, Hq, T, D), key/value (B, H, T, D), keep (B, H, T) bool, valid (B, T) bool, window >= 1, scale finite,
// and the optional extra rows extra_key/extra_value (B, H, E, D) with extra_until (B, H, E) int32.
void check_paged_prefill_attention_args(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                        const Tensor& page_table, const Tensor& lengths, const Tensor& key,
                                        const Tensor& value, const Tensor& keep, const std::optional<Tensor>& valid,
                                        int64_t window, double scale, const std::optional<Tensor>& extra_key,
                                        const std::optional<Tensor>& extra_value,
                                        const std::optional<Tensor>& extra_until, double softcap);

// CPU value check of a cache's state (csrc/kv_tables.h): every length in [0, capacity] and, for a paged cache, the
// page ids of its first ceil(length / page_size) table entries in [0, P). Returns the StatusBits found (0: valid)
// and fills `lens` with the lengths as [b * H + h].
int32_t validate_state_cpu(const paged::Tables& t, std::vector<int64_t>& lens);
// The same for the paged tensors.
int32_t validate_paged_state_cpu(const Tensor& key_pages, const Tensor& page_table, const Tensor& lengths,
                                 std::vector<int64_t>& lens);

}  // namespace attngate
