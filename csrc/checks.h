// Argument validation shared by the CPU and CUDA entry points. Each op calls its check_* function first,
// before any write, so a failed check leaves every tensor untouched. Messages name the argument.
#pragma once

#include "stable_api.h"

namespace attngate {

// The vocabulary every argument check is written in (each defined once, in checks.cpp); messages name the argument.
bool is_supported_float(ScalarType t);
// "<name> must be float32, float16 or bfloat16, got <dtype>"
void check_float(const Tensor& t, const char* name);
// "<name> must be on the same device as <ref_name> (<device>), got <device>"
void check_same_device(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name);
// "<name> must have a contiguous last dimension (stride 1), got stride <s>"
void check_last_dim_contiguous(const Tensor& t, const char* name);
// "scale must be finite" and "softcap must be finite and >= 0 (0: off)", the scalars of every attention op.
void check_attention_scalars(double scale, double softcap);

// Shape/dtype/device checks of the rectangle ops and gate_flags (metadata only: no device reads).
void check_gate_flags_args(const Tensor& gate_out, const Tensor& weight, const std::optional<Tensor>& bias,
                           double threshold, int64_t sink_tokens, int64_t position_offset,
                           const std::optional<Tensor>& valid);
void check_append_kv_args(const Tensor& key_cache, const Tensor& value_cache, const Tensor& lengths, const Tensor& key,
                          const Tensor& value, const std::optional<Tensor>& keep);
void check_compact_kv_args(const Tensor& key_cache, const Tensor& value_cache, const Tensor& lengths,
                           const Tensor& keep);
void check_decode_attention_args(const Tensor& query, const Tensor& key_cache, const Tensor& value_cache,
                                 const Tensor& lengths, double scale, double softcap);

// Codes that device kernels OR into a status word when a value check fails (lengths out of range, capacity
// overflow). The host turns a non-zero status into the same error text the CPU path raises.
enum StatusBits : int32_t {
  kStatusLengthOutOfRange = 1,  // some lengths[b, h] < 0 or > C
  kStatusCapacityOverflow = 2,  // lengths[b, h] + kept rows > C for some head (append_kv_: a rectangle's table full)
  kStatusKeepTooShort = 4,      // lengths[b, h] > L, the keep mask does not cover every live row (compact_kv_)
  // Paged ops (lengths out of range there means outside [0, M * page_size]).
  kStatusOutOfPages = 8,         // an append needs more pages than the free stack holds
  kStatusPageTableFull = 16,     // a head would need more than M pages
  kStatusBadPageId = 32,         // a page id read from page_table or free_pages is outside [0, P)
  kStatusFreeCountOutOfRange = 64,  // free_count outside [0, P], or pages given back would overflow free_pages
  kStatusBadRow = 128,           // paged_remove_rows_: a row >= lengths or listed twice in its head
};
// Raises the error for a non-zero status word; `op` names the op in the message.
void raise_for_status(const char* op, int32_t status);

// A rectangle cache is a head with one page of C rows (csrc/kv_tables.h): its "page table full" is a capacity
// overflow, and says so.
inline int32_t rect_status(int32_t status) {
  return (status & kStatusPageTableFull) ? (status & ~kStatusPageTableFull) | kStatusCapacityOverflow : status;
}

// Whether CUDA entry points read their status word back to the host (one 4-byte sync) and raise. On by
// default; skipped automatically while a CUDA graph is being captured.
bool sync_checks_enabled();
bool set_sync_checks(bool enabled);

// Whether every pointer and stride (in elements) of a row-wise access allows `bytes`-wide vector access.
bool rows_aligned_for(int64_t bytes, std::initializer_list<const Tensor*> tensors);

}  // namespace attngate
