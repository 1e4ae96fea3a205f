#include "checks.h"

#include <atomic>
#include <cmath>

#include "overlap.h"

namespace attngate {

bool is_supported_float(ScalarType t) { return t == kFloat || t == kHalf || t == kBFloat16; }

void check_float(const Tensor& t, const char* name) {
  AG_CHECK(is_supported_float(t.scalar_type()), name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_same_device(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  AG_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(), "), got ",
           t.device());
}

void check_last_dim_contiguous(const Tensor& t, const char* name) {
  AG_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have a contiguous last dimension (stride 1), got stride ",
           t.stride(-1));
}

void check_attention_scalars(double scale, double softcap) {
  AG_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  AG_CHECK(std::isfinite(softcap) && softcap >= 0, "softcap must be finite and >= 0 (0: off), got ", softcap);
}

namespace {

std::atomic<bool> g_sync_checks{true};

// The cache triple shared by append_kv_, compact_kv_ and decode_attention.
void check_cache(const Tensor& key_cache, const Tensor& value_cache, const Tensor& lengths, bool writes) {
  AG_CHECK(key_cache.dim() == 4, "key_cache must be 4-D (B, H, C, D), got shape ", key_cache.sizes());
  check_float(key_cache, "key_cache");
  AG_CHECK(same_shape(value_cache, key_cache), "value_cache must have the shape of key_cache ", key_cache.sizes(),
           ", got ", value_cache.sizes());
  AG_CHECK(value_cache.scalar_type() == key_cache.scalar_type(), "value_cache must have the dtype of key_cache (",
           key_cache.scalar_type(), "), got ", value_cache.scalar_type());
  check_same_device(value_cache, key_cache, "value_cache", "key_cache");
  check_last_dim_contiguous(key_cache, "key_cache");
  check_last_dim_contiguous(value_cache, "value_cache");
  AG_CHECK(lengths.scalar_type() == kInt, "lengths must be int32, got ", lengths.scalar_type());
  AG_CHECK(lengths.dim() == 2 && lengths.size(0) == key_cache.size(0) && lengths.size(1) == key_cache.size(1),
           "lengths must have shape (B, H) = (", key_cache.size(0), ", ", key_cache.size(1), "), got ",
           lengths.sizes());
  check_same_device(lengths, key_cache, "lengths", "key_cache");
  AG_CHECK(key_cache.size(2) <= std::numeric_limits<int32_t>::max(), "key_cache capacity C must fit in int32, got ",
           key_cache.size(2));
  if (writes) {
    // Rows that share memory would make in-place row moves race with themselves.
    check_no_row_overlap(key_cache, "key_cache");
    check_no_row_overlap(value_cache, "value_cache");
    check_no_element_overlap(lengths, "lengths");
    check_no_shared_memory(key_cache, "key_cache", value_cache, "value_cache");
    check_no_shared_memory(key_cache, "key_cache", lengths, "lengths", /*b_rows=*/false);
    check_no_shared_memory(value_cache, "value_cache", lengths, "lengths", /*b_rows=*/false);
  }
}

void check_mask(const Tensor& mask, const char* name, int64_t b, int64_t h, const Tensor& key_cache) {
  AG_CHECK(mask.scalar_type() == kBool, name, " must be bool, got ", mask.scalar_type());
  AG_CHECK(mask.dim() == 3 && mask.size(0) == b && mask.size(1) == h, name,
           " must have shape (B, H, L) with (B, H) = (", b, ", ", h, "), got ", mask.sizes());
  check_same_device(mask, key_cache, name, "key_cache");
}

}  // namespace

bool sync_checks_enabled() { return g_sync_checks.load(std::memory_order_relaxed); }

bool set_sync_checks(bool enabled) { return g_sync_checks.exchange(enabled); }

void raise_for_status(const char* op, int32_t status) {
  AG_CHECK(!(status & kStatusLengthOutOfRange), op,
           ": lengths must lie in [0, C] for every (batch, head), C the capacity (M * page_size for a paged cache); "
           "nothing was written");
  AG_CHECK(!(status & kStatusKeepTooShort), op,
           ": keep must cover every live row (L >= max(lengths)); nothing was written");
  AG_CHECK(!(status & kStatusCapacityOverflow), op,
           ": capacity overflow, lengths + kept rows would exceed the key_cache capacity C for some (batch, head); "
           "nothing was written");
  AG_CHECK(!(status & kStatusFreeCountOutOfRange), op,
           ": free_count must lie in [0, P] and the pages given back must fit in free_pages; nothing was written");
  AG_CHECK(!(status & kStatusBadPageId), op,
           ": a page id in page_table or free_pages is outside [0, P); nothing was written");
  AG_CHECK(!(status & kStatusBadRow), op,
           ": rows must be distinct live rows (< lengths) of their head; nothing was written");
  AG_CHECK(!(status & kStatusPageTableFull), op,
           ": page table full, a head would need more than M pages (page_table.size(2)); nothing was written");
  AG_CHECK(!(status & kStatusOutOfPages), op,
           ": out of pages, the op needs more pages than free_count holds; nothing was written");
  AG_CHECK(status == 0, op, ": unknown device status ", status);
}

bool rows_aligned_for(int64_t bytes, std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* t : tensors) {
    const int64_t elem = static_cast<int64_t>(t->element_size());
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % bytes != 0) return false;
    for (int64_t d = 0; d < t->dim(); ++d) {
      if (t->size(d) > 1 && (t->stride(d) * elem) % bytes != 0 && d != t->dim() - 1) return false;
    }
    if ((t->size(-1) * elem) % bytes != 0) return false;
  }
  return true;
}

void check_gate_flags_args(const Tensor& gate_out, const Tensor& weight, const std::optional<Tensor>& bias,
                           double threshold, int64_t sink_tokens, int64_t position_offset,
                           const std::optional<Tensor>& valid) {
  AG_CHECK(gate_out.dim() == 3, "gate_out must be 3-D (B, T, G), got shape ", gate_out.sizes());
  check_float(gate_out, "gate_out");
  check_last_dim_contiguous(gate_out, "gate_out");
  AG_CHECK(weight.dim() == 2 && weight.size(1) == gate_out.size(2),
           "weight must have shape (H, G) with G = ", gate_out.size(2), ", got ", weight.sizes());
  AG_CHECK(weight.scalar_type() == gate_out.scalar_type(), "weight must have the dtype of gate_out (",
           gate_out.scalar_type(), "), got ", weight.scalar_type());
  check_same_device(weight, gate_out, "weight", "gate_out");
  check_last_dim_contiguous(weight, "weight");
  if (bias.has_value()) {
    AG_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape (H,) = (", weight.size(0),
             ",), got ", bias->sizes());
    AG_CHECK(bias->scalar_type() == weight.scalar_type(), "bias must have the dtype of weight (", weight.scalar_type(),
             "), got ", bias->scalar_type());
    check_same_device(*bias, gate_out, "bias", "gate_out");
  }
  AG_CHECK(!std::isnan(threshold), "threshold must not be NaN");
  AG_CHECK(sink_tokens >= 0, "sink_tokens must be >= 0, got ", sink_tokens);
  AG_CHECK(position_offset >= 0, "position_offset must be >= 0, got ", position_offset);
  if (valid.has_value()) {
    AG_CHECK(valid->scalar_type() == kBool, "valid must be bool, got ", valid->scalar_type());
    AG_CHECK(valid->dim() == 2 && valid->size(0) == gate_out.size(0) && valid->size(1) == gate_out.size(1),
             "valid must have shape (B, T) = (", gate_out.size(0), ", ", gate_out.size(1), "), got ", valid->sizes());
    check_same_device(*valid, gate_out, "valid", "gate_out");
  }
}

void check_append_kv_args(const Tensor& key_cache, const Tensor& value_cache, const Tensor& lengths, const Tensor& key,
                          const Tensor& value, const std::optional<Tensor>& keep) {
  check_cache(key_cache, value_cache, lengths, /*writes=*/true);
  const int64_t B = key_cache.size(0), H = key_cache.size(1), D = key_cache.size(3);
  AG_CHECK(key.dim() == 4 && key.size(0) == B && key.size(1) == H && key.size(3) == D,
           "key must have shape (B, H, T, D) with (B, H, D) = (", B, ", ", H, ", ", D, "), got ", key.sizes());
  AG_CHECK(same_shape(value, key), "value must have the shape of key ", key.sizes(), ", got ", value.sizes());
  AG_CHECK(key.scalar_type() == key_cache.scalar_type(), "key must have the dtype of key_cache (",
           key_cache.scalar_type(), "), got ", key.scalar_type());
  AG_CHECK(value.scalar_type() == key_cache.scalar_type(), "value must have the dtype of key_cache (",
           key_cache.scalar_type(), "), got ", value.scalar_type());
  check_same_device(key, key_cache, "key", "key_cache");
  check_same_device(value, key_cache, "value", "key_cache");
  check_last_dim_contiguous(key, "key");
  check_last_dim_contiguous(value, "value");
  AG_CHECK(key.size(2) <= std::numeric_limits<int32_t>::max(), "key must have T < 2^31, got ", key.size(2));
  if (keep.has_value()) {
    check_mask(*keep, "keep", B, H, key_cache);
    AG_CHECK(keep->size(2) == key.size(2), "keep must have shape (B, H, T) with T = ", key.size(2), ", got ",
             keep->sizes());
  }
  // The new rows are read while cache rows are written: they must not alias the caches.
  check_no_shared_memory(key_cache, "key_cache", key, "key");
  check_no_shared_memory(key_cache, "key_cache", value, "value");
  check_no_shared_memory(value_cache, "value_cache", key, "key");
  check_no_shared_memory(value_cache, "value_cache", value, "value");
}

void check_compact_kv_args(const Tensor& key_cache, const Tensor& value_cache, const Tensor& lengths,
                           const Tensor& keep) {
  check_cache(key_cache, value_cache, lengths, /*writes=*/true);
  check_mask(keep, "keep", key_cache.size(0), key_cache.size(1), key_cache);
  check_no_shared_memory(key_cache, "key_cache", keep, "keep", /*b_rows=*/false);
  check_no_shared_memory(value_cache, "value_cache", keep, "keep", /*b_rows=*/false);
}

void check_decode_attention_args(const Tensor& query, const Tensor& key_cache, const Tensor& value_cache,
                                 const Tensor& lengths, double scale, double softcap) {
  check_cache(key_cache, value_cache, lengths, /*writes=*/false);
  const int64_t B = key_cache.size(0), H = key_cache.size(1), D = key_cache.size(3);
  AG_CHECK(query.dim() == 3 && query.size(0) == B && query.size(2) == D,
           "query must have shape (B, Hq, D) with (B, D) = (", B, ", ", D, "), got ", query.sizes());
  AG_CHECK(H > 0 ? query.size(1) % H == 0 && query.size(1) > 0 : query.size(1) == 0,
           "query heads Hq must be a positive multiple of the KV heads H = ", H, ", got Hq = ", query.size(1));
  AG_CHECK(query.scalar_type() == key_cache.scalar_type(), "query must have the dtype of key_cache (",
           key_cache.scalar_type(), "), got ", query.scalar_type());
  check_same_device(query, key_cache, "query", "key_cache");
  check_last_dim_contiguous(query, "query");
  check_attention_scalars(scale, softcap);
}

}  // namespace attngate
