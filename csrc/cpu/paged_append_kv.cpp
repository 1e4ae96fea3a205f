// CPU kernel of attngate::paged_append_kv_ and attngate::append_kv_ (a rectangle cache: one owned page per head,
// csrc/kv_tables.h): writes the kept new rows after each head's rows, popping new pages from the free stack of a
// paged cache (semantics: attngate_ext/ops/paged_reference.py and reference.py).
//
// Validate everything, then plan (sequential, per-head counts and page needs in (b, h) order, page ids popped),
// then copy rows in parallel over heads: a failing call leaves every tensor untouched.
#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "cpu/paged_storage.h"
#include "cpu/storage_kernels.h"
#include "dispatch.h"
#include "paged_storage_checks.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

template <typename scalar_t>
void copy_new_rows(const cpu::PagedRows<scalar_t>& pool,  // the pools (P, S, D) or the rectangle (B, H, C, D)
                   const cpu::Tables& t,                  // page table already holds the new pages
                   const Tensor& key, const Tensor& value,  // (B, H, T, D)
                   const Tensor& keep,                      // (B, H, T) bool or undefined
                   const std::vector<int64_t>& old) {       // [b * H + h] rows before the append
  const int64_t H = key.size(1), T = key.size(2), D = key.size(3);
  const scalar_t* k = key.const_data_ptr<scalar_t>();
  const scalar_t* v = value.const_data_ptr<scalar_t>();
  const bool* keep_p = keep.defined() ? keep.const_data_ptr<bool>() : nullptr;
  const cpu::Strides3 ks = cpu::strides3(key), vs = cpu::strides3(value);
  const cpu::Strides3 keeps = keep.defined() ? cpu::strides3(keep) : cpu::Strides3{};
  torch::stable::parallel_for(0, static_cast<int64_t>(old.size()), cpu::grain_for(2 * T * D), [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      cpu::RowWalker<scalar_t> dst(pool, t, bh, old[bh]);
      for (int64_t i = 0; i < T; ++i) {
        if (keep_p != nullptr && !keep_p[keeps.at(b, h, i)]) continue;
        std::copy_n(k + ks.at(b, h, i), D, dst.key());
        std::copy_n(v + vs.at(b, h, i), D, dst.value());
        dst.next();
      }
    }
  });
}

}  // namespace

namespace cpu {

void append_rows(const char* op, const paged::Tables& t, Tensor& key_pages, Tensor& value_pages,
                 const paged::Pool& key_pool, const paged::Pool& value_pool, const Tensor& key, const Tensor& value,
                 const std::optional<Tensor>& keep) {
  const int64_t H = t.H, T = key.size(2), S = t.S, BH = t.B * t.H;
  auto raise = [&](int32_t status) { raise_for_status(op, t.owns_pages() ? rect_status(status) : status); };

  // 1. lengths in [0, M * S], free_count in [0, P].
  std::vector<int64_t> old;
  int64_t free = 0;
  raise(check_state(t, old, free));

  // 2. kept rows and new pages of each head; no head may outgrow its table row (a rectangle: its capacity).
  std::vector<int64_t> next(old), need(static_cast<size_t>(BH), 0);
  int64_t total_need = 0;
  int32_t status = 0;
  const Strides3 keeps = keep.has_value() ? strides3(*keep) : Strides3{};
  for (int64_t bh = 0; bh < BH; ++bh) {
    int64_t kept = T;
    if (keep.has_value()) {
      const bool* kp = keep->const_data_ptr<bool>() + keeps.at(bh / H, bh % H, 0);
      kept = 0;
      for (int64_t i = 0; i < T; ++i) kept += kp[i * keeps.s2];
    }
    next[bh] = old[bh] + kept;
    if (pages_for(next[bh], S) > t.M) status |= kStatusPageTableFull;
    need[bh] = t.owns_pages() ? 0 : pages_for(next[bh], S) - pages_for(old[bh], S);
    total_need += need[bh];
  }
  raise(status);
  if (!t.owns_pages()) {
    // 3. enough free pages.
    if (total_need > free) raise(kStatusOutOfPages);
    // 4. every page written: the partly filled last page of a head that grows, and the pages popped.
    for (int64_t bh = 0; bh < BH; ++bh) {
      if (next[bh] > old[bh] && old[bh] % S != 0 && !t.id_ok(*t.entry(bh, old[bh] / S))) status |= kStatusBadPageId;
    }
    for (int64_t c = 0; c < total_need; ++c) {
      if (!t.id_ok(*t.free_at(free - 1 - c))) status |= kStatusBadPageId;
    }
    raise(status);
  }

  // Pop: head by head in (b, h) order, each head's pages in table order, from the top of the stack.
  int64_t top = free;
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t first = pages_for(old[bh], S);
    for (int64_t i = 0; i < need[bh]; ++i) *t.entry(bh, first + i) = *t.free_at(--top);
  }
  if (T > 0 && key.size(3) > 0) {
    ATTNGATE_DISPATCH_FLOATING_TYPES(key_pages.scalar_type(), "append_rows_cpu", [&] {
      const PagedRows<scalar_t> pool(key_pages, value_pages, key_pool, value_pool);
      copy_new_rows<scalar_t>(pool, t, key, value, keep.has_value() ? *keep : Tensor(), old);
    });
  }
  for (int64_t bh = 0; bh < BH; ++bh) *t.length(bh) = static_cast<int32_t>(next[bh]);
  if (!t.owns_pages()) *t.free_count = static_cast<int32_t>(top);
}

}  // namespace cpu

void paged_append_kv_cpu(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                         Tensor& free_pages, Tensor& free_count, const Tensor& key, const Tensor& value,
                         const std::optional<Tensor>& keep) {
  check_paged_append_args(key_pages, value_pages, page_table, lengths, free_pages, free_count, key, value, keep);
  cpu::append_rows("paged_append_kv_", paged::make_tables(key_pages, page_table, lengths, free_pages, free_count),
              key_pages, value_pages, paged::make_pool(key_pages), paged::make_pool(value_pages), key, value, keep);
}

ATTNGATE_IMPL(CPU, paged_append_kv_, paged_append_kv_cpu);

}  // namespace attngate
