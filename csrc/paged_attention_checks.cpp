#include "paged_attention_checks.h"

#include <cmath>
#include <limits>

#include <c10/util/Exception.h>

#include "checks.h"
#include "paged_checks.h"

namespace attngate {
namespace {

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as key_pages (", ref.device(), "), got ",
              t.device());
}

// query (B, Hq, ..., D): batch and head dim match the cache, Hq a positive multiple of H, same dtype and device.
void check_query(const at::Tensor& query, const at::Tensor& key_pages, const at::Tensor& page_table, int64_t dims) {
  const int64_t B = page_table.size(0), H = page_table.size(1), D = key_pages.size(2);
  TORCH_CHECK(query.dim() == dims && query.size(0) == B && query.size(-1) == D, "query must have shape ",
              dims == 3 ? "(B, Hq, D)" : "(B, Hq, T, D)", " with (B, D) = (", B, ", ", D, "), got ", query.sizes());
  TORCH_CHECK(H > 0 ? query.size(1) % H == 0 && query.size(1) > 0 : query.size(1) == 0,
              "query heads Hq must be a positive multiple of the KV heads H = ", H, ", got Hq = ", query.size(1));
  TORCH_CHECK(query.scalar_type() == key_pages.scalar_type(), "query must have the dtype of key_pages (",
              key_pages.scalar_type(), "), got ", query.scalar_type());
  check_same_device(query, key_pages, "query");
  TORCH_CHECK(query.size(-1) <= 1 || query.stride(-1) == 1,
              "query must have a contiguous last dimension (stride 1), got stride ", query.stride(-1));
}

// A (B, H, n) per-row tensor of `dtype` on the cache's device.
void check_rows_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, const char* dtype_name, int64_t B,
                       int64_t H, int64_t n, const char* n_name, const at::Tensor& key_pages) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype_name, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == B && t.size(1) == H && t.size(2) == n, name, " must have shape (B, H, ",
              n_name, ") = (", B, ", ", H, ", ", n, "), got ", t.sizes());
  check_same_device(t, key_pages, name);
}

// extra_key/extra_value (B, H, E, D) and their per-row mask (extra_valid or extra_until), all or none.
void check_extra(const at::Tensor& key_pages, const at::Tensor& page_table, const std::optional<at::Tensor>& extra_key,
                 const std::optional<at::Tensor>& extra_value, const std::optional<at::Tensor>& extra_rows,
                 const char* rows_name, at::ScalarType rows_dtype, const char* rows_dtype_name) {
  if (!extra_key.has_value()) {
    TORCH_CHECK(!extra_value.has_value(), "extra_value was given without extra_key");
    TORCH_CHECK(!extra_rows.has_value(), rows_name, " was given without extra_key");
    return;
  }
  TORCH_CHECK(extra_value.has_value(), "extra_key was given without extra_value");
  check_new_rows(*extra_key, "extra_key", key_pages, page_table, /*rows_dim=*/true);
  check_new_rows(*extra_value, "extra_value", key_pages, page_table, /*rows_dim=*/true);
  TORCH_CHECK(extra_value->sizes() == extra_key->sizes(), "extra_value must have the shape of extra_key ",
              extra_key->sizes(), ", got ", extra_value->sizes());
  TORCH_CHECK(extra_key->size(2) <= std::numeric_limits<int32_t>::max(), "extra_key must have E < 2^31 rows, got ",
              extra_key->size(2));
  if (extra_rows.has_value()) {
    check_rows_tensor(*extra_rows, rows_name, rows_dtype, rows_dtype_name, page_table.size(0), page_table.size(1),
                      extra_key->size(2), "E", key_pages);
  }
}

}  // namespace

void check_paged_decode_attention_args(const at::Tensor& query, const at::Tensor& key_pages,
                                       const at::Tensor& value_pages, const at::Tensor& page_table,
                                       const at::Tensor& lengths, double scale,
                                       const std::optional<at::Tensor>& extra_key,
                                       const std::optional<at::Tensor>& extra_value,
                                       const std::optional<at::Tensor>& extra_valid) {
  check_paged_cache(key_pages, value_pages, page_table, lengths, /*writes=*/false);
  check_query(query, key_pages, page_table, 3);
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  check_extra(key_pages, page_table, extra_key, extra_value, extra_valid, "extra_valid", at::kBool, "bool");
}

void check_paged_prefill_attention_args(const at::Tensor& query, const at::Tensor& key_pages,
                                        const at::Tensor& value_pages, const at::Tensor& page_table,
                                        const at::Tensor& lengths, const at::Tensor& key, const at::Tensor& value,
                                        const at::Tensor& keep, const std::optional<at::Tensor>& valid,
                                        int64_t window, double scale, const std::optional<at::Tensor>& extra_key,
                                        const std::optional<at::Tensor>& extra_value,
                                        const std::optional<at::Tensor>& extra_until) {
  check_paged_cache(key_pages, value_pages, page_table, lengths, /*writes=*/false);
  check_query(query, key_pages, page_table, 4);
  const int64_t B = page_table.size(0), H = page_table.size(1), T = query.size(2);
  TORCH_CHECK(T <= std::numeric_limits<int32_t>::max() / 2, "query must have T < 2^30 tokens, got ", T);
  check_new_rows(key, "key", key_pages, page_table, /*rows_dim=*/true);
  TORCH_CHECK(key.size(2) == T, "key must have shape (B, H, T, D) with T = ", T, " (query's), got ", key.sizes());
  check_new_rows(value, "value", key_pages, page_table, /*rows_dim=*/true);
  TORCH_CHECK(value.sizes() == key.sizes(), "value must have the shape of key ", key.sizes(), ", got ",
              value.sizes());
  check_rows_tensor(keep, "keep", at::kBool, "bool", B, H, T, "T", key_pages);
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool, "valid must be bool, got ", valid->scalar_type());
    TORCH_CHECK(valid->dim() == 2 && valid->size(0) == B && valid->size(1) == T, "valid must have shape (B, T) = (",
                B, ", ", T, "), got ", valid->sizes());
    check_same_device(*valid, key_pages, "valid");
  }
  TORCH_CHECK(window >= 1, "window must be >= 1, got ", window);
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  check_extra(key_pages, page_table, extra_key, extra_value, extra_until, "extra_until", at::kInt, "int32");
}

int32_t validate_paged_state_cpu(const at::Tensor& key_pages, const at::Tensor& page_table, const at::Tensor& lengths,
                                 std::vector<int64_t>& lens) {
  const int64_t B = page_table.size(0), H = page_table.size(1), M = page_table.size(2);
  const int64_t P = key_pages.size(0), S = key_pages.size(1);
  const int32_t* len = lengths.data_ptr<int32_t>();
  const int32_t* table = page_table.data_ptr<int32_t>();
  lens.assign(static_cast<size_t>(B * H), 0);
  int32_t status = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t n = len[b * lengths.stride(0) + h * lengths.stride(1)];
      if (n < 0 || n > M * S) {
        status |= kStatusLengthOutOfRange;
        continue;
      }
      lens[b * H + h] = n;
      const int32_t* row = table + b * page_table.stride(0) + h * page_table.stride(1);
      for (int64_t i = 0; i < (n + S - 1) / S; ++i) {
        const int64_t id = row[i * page_table.stride(2)];
        if (id < 0 || id >= P) status |= kStatusBadPageId;
      }
    }
  }
  return status;
}

}  // namespace attngate
