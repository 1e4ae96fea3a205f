#include "paged_checks.h"

#include <limits>
#include <utility>

#include "checks.h"
#include "overlap.h"

namespace attngate {

void check_paged_cache(const Tensor& key_pages, const Tensor& value_pages, const Tensor& page_table,
                       const Tensor& lengths, bool writes) {
  AG_CHECK(key_pages.dim() == 3, "key_pages must be 3-D (P, page_size, D), got shape ", key_pages.sizes());
  check_float(key_pages, "key_pages");
  AG_CHECK(same_shape(value_pages, key_pages), "value_pages must have the shape of key_pages ", key_pages.sizes(),
           ", got ", value_pages.sizes());
  AG_CHECK(value_pages.scalar_type() == key_pages.scalar_type(), "value_pages must have the dtype of key_pages (",
           key_pages.scalar_type(), "), got ", value_pages.scalar_type());
  check_same_device(value_pages, key_pages, "value_pages", "key_pages");
  AG_CHECK(key_pages.size(1) > 0, "key_pages must have page_size >= 1, got shape ", key_pages.sizes());
  check_last_dim_contiguous(key_pages, "key_pages");
  check_last_dim_contiguous(value_pages, "value_pages");
  AG_CHECK(key_pages.size(0) <= std::numeric_limits<int32_t>::max(), "key_pages must have P < 2^31 pages, got ",
           key_pages.size(0));
  AG_CHECK(page_table.dim() == 3, "page_table must be 3-D (B, H, M), got shape ", page_table.sizes());
  AG_CHECK(page_table.scalar_type() == kInt, "page_table must be int32, got ", page_table.scalar_type());
  check_same_device(page_table, key_pages, "page_table", "key_pages");
  AG_CHECK(page_table.size(2) * key_pages.size(1) <= std::numeric_limits<int32_t>::max(),
           "page_table rows M times page_size must fit in int32, got M = ", page_table.size(2),
           " and page_size = ", key_pages.size(1));
  AG_CHECK(lengths.scalar_type() == kInt, "lengths must be int32, got ", lengths.scalar_type());
  AG_CHECK(lengths.dim() == 2 && lengths.size(0) == page_table.size(0) && lengths.size(1) == page_table.size(1),
           "lengths must have shape (B, H) = (", page_table.size(0), ", ", page_table.size(1), "), got ",
           lengths.sizes());
  check_same_device(lengths, key_pages, "lengths", "key_pages");
  if (writes) {
    check_no_row_overlap(key_pages, "key_pages");
    check_no_row_overlap(value_pages, "value_pages");
    check_no_element_overlap(page_table, "page_table");
    check_no_element_overlap(lengths, "lengths");
    check_no_shared_memory(key_pages, "key_pages", value_pages, "value_pages");
    check_no_shared_memory(torch::stable::unsqueeze(page_table, -1), "page_table", lengths, "lengths",
                           /*b_rows=*/false);  // elements, not rows
  }
}

void check_free_stack(const Tensor& key_pages, const Tensor& free_pages, const Tensor& free_count) {
  AG_CHECK(free_pages.scalar_type() == kInt, "free_pages must be int32, got ", free_pages.scalar_type());
  AG_CHECK(free_pages.dim() == 1 && free_pages.size(0) == key_pages.size(0), "free_pages must have shape (P,) = (",
           key_pages.size(0), ",), got ", free_pages.sizes());
  AG_CHECK(free_count.scalar_type() == kInt, "free_count must be int32, got ", free_count.scalar_type());
  AG_CHECK(free_count.dim() == 1 && free_count.size(0) == 1, "free_count must have shape (1,), got ",
           free_count.sizes());
  check_same_device(free_pages, key_pages, "free_pages", "key_pages");
  check_same_device(free_count, key_pages, "free_count", "key_pages");
  check_no_element_overlap(free_pages, "free_pages");
  check_no_shared_memory(torch::stable::unsqueeze(free_pages, -1), "free_pages", free_count, "free_count",
                         /*b_rows=*/false);
}

void check_new_rows(const Tensor& rows, const char* name, const Tensor& key_pages, const Tensor& page_table,
                    bool rows_dim) {
  const int64_t B = page_table.size(0), H = page_table.size(1), D = key_pages.size(2);
  const int64_t want_dim = rows_dim ? 4 : 3;
  AG_CHECK(rows.dim() == want_dim && rows.size(0) == B && rows.size(1) == H && rows.size(-1) == D, name,
           rows_dim ? " must have shape (B, H, T, D)" : " must have shape (B, H, D)", " with (B, H, D) = (", B, ", ", H,
           ", ", D, "), got ", rows.sizes());
  AG_CHECK(rows.scalar_type() == key_pages.scalar_type(), name, " must have the dtype of key_pages (",
           key_pages.scalar_type(), "), got ", rows.scalar_type());
  check_same_device(rows, key_pages, name, "key_pages");
  check_last_dim_contiguous(rows, name);
}

}  // namespace attngate
