// CPU kernel of attngate::paged_append_kv_: writes the kept new rows after each head's rows in its pages, popping
// new pages from the free stack (semantics: attngate_ext/ops/paged_reference.py).
//
// Validate everything, then plan (sequential, per-head counts and page needs in (b, h) order, page ids popped),
// then copy rows in parallel over heads: a failing call leaves every tensor untouched.
#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "dispatch.h"
#include "paged_storage_checks.h"
#include "paged_storage_cpu.h"

namespace attngate {
namespace {

template <typename scalar_t>
void paged_append_rows(at::Tensor& key_pages, at::Tensor& value_pages,  // (P, S, D)
                       const cpu::Tables& t,                      // page table already holds the new pages
                       const at::Tensor& key, const at::Tensor& value,  // (B, H, T, D)
                       const at::Tensor& keep,                          // (B, H, T) bool or undefined
                       const std::vector<int64_t>& old) {               // [b * H + h] rows before the append
  const int64_t H = key.size(1), T = key.size(2), D = key.size(3);
  const cpu::PagedRows<scalar_t> pool(key_pages, value_pages);
  const scalar_t* k = key.data_ptr<scalar_t>();
  const scalar_t* v = value.data_ptr<scalar_t>();
  const bool* keep_p = keep.defined() ? keep.data_ptr<bool>() : nullptr;
  at::parallel_for(0, static_cast<int64_t>(old.size()), cpu::grain_for(2 * T * D), [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      cpu::RowCursor dst(t, bh, old[bh]);
      for (int64_t i = 0; i < T; ++i) {
        if (keep_p != nullptr && !keep_p[b * keep.stride(0) + h * keep.stride(1) + i * keep.stride(2)]) continue;
        const int64_t page = dst.page();
        std::copy_n(k + b * key.stride(0) + h * key.stride(1) + i * key.stride(2), D, pool.key_row(page, dst.slot));
        std::copy_n(v + b * value.stride(0) + h * value.stride(1) + i * value.stride(2), D,
                    pool.value_row(page, dst.slot));
        dst.next();
      }
    }
  });
}

void paged_append_kv_cpu(at::Tensor& key_pages, at::Tensor& value_pages, at::Tensor& page_table, at::Tensor& lengths,
                         at::Tensor& free_pages, at::Tensor& free_count, const at::Tensor& key,
                         const at::Tensor& value, const std::optional<at::Tensor>& keep) {
  check_paged_append_args(key_pages, value_pages, page_table, lengths, free_pages, free_count, key, value, keep);
  const cpu::Tables t = paged::make_tables(key_pages, page_table, lengths, free_pages, free_count);
  const int64_t H = t.H, T = key.size(2), S = t.S, BH = t.B * t.H;

  // 1. lengths in [0, M * S], free_count in [0, P].
  std::vector<int64_t> old;
  int64_t free = 0;
  raise_for_status("paged_append_kv_", cpu::check_state(t, old, free));

  // 2. kept rows and new pages of each head; no head may outgrow its table row.
  std::vector<int64_t> next(old), need(static_cast<size_t>(BH), 0);
  int64_t total_need = 0;
  int32_t status = 0;
  for (int64_t bh = 0; bh < BH; ++bh) {
    int64_t kept = T;
    if (keep.has_value()) {
      const bool* kp = keep->data_ptr<bool>() + (bh / H) * keep->stride(0) + (bh % H) * keep->stride(1);
      kept = 0;
      for (int64_t i = 0; i < T; ++i) kept += kp[i * keep->stride(2)];
    }
    next[bh] = old[bh] + kept;
    if (cpu::pages_for(next[bh], S) > t.M) status |= kStatusPageTableFull;
    need[bh] = cpu::pages_for(next[bh], S) - cpu::pages_for(old[bh], S);
    total_need += need[bh];
  }
  raise_for_status("paged_append_kv_", status);
  // 3. enough free pages.
  if (total_need > free) raise_for_status("paged_append_kv_", kStatusOutOfPages);
  // 4. every page written: the partly filled last page of a head that grows, and the pages popped.
  for (int64_t bh = 0; bh < BH; ++bh) {
    if (next[bh] > old[bh] && old[bh] % S != 0 && !t.id_ok(*t.entry(bh, old[bh] / S))) status |= kStatusBadPageId;
  }
  for (int64_t c = 0; c < total_need; ++c) {
    if (!t.id_ok(*t.free_at(free - 1 - c))) status |= kStatusBadPageId;
  }
  raise_for_status("paged_append_kv_", status);

  // Pop: head by head in (b, h) order, each head's pages in table order, from the top of the stack.
  int64_t top = free;
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t first = cpu::pages_for(old[bh], S);
    for (int64_t i = 0; i < need[bh]; ++i) *t.entry(bh, first + i) = *t.free_at(--top);
  }
  if (T > 0 && key.size(3) > 0) {
    ATTNGATE_DISPATCH_FLOATING_TYPES(key_pages.scalar_type(), "paged_append_kv_cpu", [&] {
      paged_append_rows<scalar_t>(key_pages, value_pages, t, key, value, keep.has_value() ? *keep : at::Tensor(),
                                  old);
    });
  }
  for (int64_t bh = 0; bh < BH; ++bh) *t.length(bh) = static_cast<int32_t>(next[bh]);
  *t.free_count = static_cast<int32_t>(top);
}

}  // namespace

TORCH_LIBRARY_IMPL(attngate, CPU, m) { m.impl("paged_append_kv_", &paged_append_kv_cpu); }

}  // namespace attngate
