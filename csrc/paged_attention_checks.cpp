#include "paged_attention_checks.h"

#include <cmath>
#include <limits>

#include "checks.h"
#include "paged_checks.h"

namespace attngate {
namespace {

// query (B, Hq, ..., D): batch and head dim match the cache, Hq a positive multiple of H, same dtype and device.
void check_query(const Tensor& query, const Tensor& key_pages, const Tensor& page_table, int64_t dims) {
  const int64_t B = page_table.size(0), H = page_table.size(1), D = key_pages.size(2);
  AG_CHECK(query.dim() == dims && query.size(0) == B && query.size(-1) == D, "query must have shape ",
           dims == 3 ? "(B, Hq, D)" : "(B, Hq, T, D)", " with (B, D) = (", B, ", ", D, "), got ", query.sizes());
  AG_CHECK(H > 0 ? query.size(1) % H == 0 && query.size(1) > 0 : query.size(1) == 0,
           "query heads Hq must be a positive multiple of the KV heads H = ", H, ", got Hq = ", query.size(1));
  AG_CHECK(query.scalar_type() == key_pages.scalar_type(), "query must have the dtype of key_pages (",
           key_pages.scalar_type(), "), got ", query.scalar_type());
  check_same_device(query, key_pages, "query", "key_pages");
  check_last_dim_contiguous(query, "query");
}

// A (B, H, n) per-row tensor of `dtype` on the cache's device.
void check_rows_tensor(const Tensor& t, const char* name, ScalarType dtype, const char* dtype_name, int64_t B,
                       int64_t H, int64_t n, const char* n_name, const Tensor& key_pages) {
  AG_CHECK(t.scalar_type() == dtype, name, " must be ", dtype_name, ", got ", t.scalar_type());
  AG_CHECK(t.dim() == 3 && t.size(0) == B && t.size(1) == H && t.size(2) == n, name, " must have shape (B, H, ", n_name,
           ") = (", B, ", ", H, ", ", n, "), got ", t.sizes());
  check_same_device(t, key_pages, name, "key_pages");
}

// extra_key/extra_value (B, H, E, D) and their per-row mask (extra_valid or extra_until), all or none.
void check_extra(const Tensor& key_pages, const Tensor& page_table, const std::optional<Tensor>& extra_key,
                 const std::optional<Tensor>& extra_value, const std::optional<Tensor>& extra_rows,
                 const char* rows_name, ScalarType rows_dtype, const char* rows_dtype_name) {
  if (!extra_key.has_value()) {
    AG_CHECK(!extra_value.has_value(), "extra_value was given without extra_key");
    AG_CHECK(!extra_rows.has_value(), rows_name, " was given without extra_key");
    return;
  }
  AG_CHECK(extra_value.has_value(), "extra_key was given without extra_value");
  check_new_rows(*extra_key, "extra_key", key_pages, page_table, /*rows_dim=*/true);
  check_new_rows(*extra_value, "extra_value", key_pages, page_table, /*rows_dim=*/true);
  AG_CHECK(same_shape(*extra_value, *extra_key), "extra_value must have the shape of extra_key ",
           extra_key->sizes(), ", got ", extra_value->sizes());
  AG_CHECK(extra_key->size(2) <= std::numeric_limits<int32_t>::max(), "extra_key must have E < 2^31 rows, got ",
           extra_key->size(2));
  if (extra_rows.has_value()) {
    check_rows_tensor(*extra_rows, rows_name, rows_dtype, rows_dtype_name, page_table.size(0), page_table.size(1),
                      extra_key->size(2), "E", key_pages);
  }
}

}  // namespace

void check_paged_decode_attention_args(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                       const Tensor& page_table, const Tensor& lengths, double scale,
                                       const std::optional<Tensor>& extra_key, const std::optional<Tensor>& extra_value,
                                       const std::optional<Tensor>& extra_valid, double softcap) {
  check_paged_cache(key_pages, value_pages, page_table, lengths, /*writes=*/false);
  check_query(query, key_pages, page_table, 3);
  check_attention_scalars(scale, softcap);
  check_extra(key_pages, page_table, extra_key, extra_value, extra_valid, "extra_valid", kBool, "bool");
}

void check_paged_prefill_attention_args(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                        const Tensor& page_table, const Tensor& lengths, const Tensor& key,
                                        const Tensor& value, const Tensor& keep, const std::optional<Tensor>& valid,
                                        int64_t window, double scale, const std::optional<Tensor>& extra_key,
                                        const std::optional<Tensor>& extra_value,
                                        const std::optional<Tensor>& extra_until, double softcap) {
  check_paged_cache(key_pages, value_pages, page_table, lengths, /*writes=*/false);
  check_query(query, key_pages, page_table, 4);
  const int64_t B = page_table.size(0), H = page_table.size(1), T = query.size(2);
  AG_CHECK(T <= std::numeric_limits<int32_t>::max() / 2, "query must have T < 2^30 tokens, got ", T);
  check_new_rows(key, "key", key_pages, page_table, /*rows_dim=*/true);
  AG_CHECK(key.size(2) == T, "key must have shape (B, H, T, D) with T = ", T, " (query's), got ", key.sizes());
  check_new_rows(value, "value", key_pages, page_table, /*rows_dim=*/true);
  AG_CHECK(same_shape(value, key), "value must have the shape of key ", key.sizes(), ", got ", value.sizes());
  check_rows_tensor(keep, "keep", kBool, "bool", B, H, T, "T", key_pages);
  if (valid.has_value()) {
    AG_CHECK(valid->scalar_type() == kBool, "valid must be bool, got ", valid->scalar_type());
    AG_CHECK(valid->dim() == 2 && valid->size(0) == B && valid->size(1) == T, "valid must have shape (B, T) = (", B,
             ", ", T, "), got ", valid->sizes());
    check_same_device(*valid, key_pages, "valid", "key_pages");
  }
  AG_CHECK(window >= 1, "window must be >= 1, got ", window);
  check_attention_scalars(scale, softcap);
  check_extra(key_pages, page_table, extra_key, extra_value, extra_until, "extra_until", kInt, "int32");
}

int32_t validate_state_cpu(const paged::Tables& t, std::vector<int64_t>& lens) {
  const int64_t BH = t.B * t.H;
  lens.assign(static_cast<size_t>(BH), 0);
  int32_t status = 0;
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t n = *t.length(bh);
    if (n < 0 || n > t.capacity()) {
      status |= kStatusLengthOutOfRange;
      continue;
    }
    lens[bh] = n;
    if (t.owns_pages()) continue;
    for (int64_t i = 0; i < paged::pages_for(n, t.S); ++i) {
      if (!t.id_ok(*t.entry(bh, i))) status |= kStatusBadPageId;
    }
  }
  return status;
}

int32_t validate_paged_state_cpu(const Tensor& key_pages, const Tensor& page_table, const Tensor& lengths,
                                 std::vector<int64_t>& lens) {
  return validate_state_cpu(paged::make_read_tables(key_pages, page_table, lengths), lens);
}

}  // namespace attngate
