// CPU kernel of attngate::paged_compact_kv_ and attngate::compact_kv_ (a rectangle cache: one owned page per head,
// csrc/kv_tables.h): stable in-place compaction of each head's rows; the pages that empty go back onto the free stack
// of a paged cache (semantics: attngate_ext/ops/paged_reference.py and reference.py).
//
// Validate everything (including the free-stack overflow, which needs the kept counts), then move rows in
// parallel over heads, then give the pages back: a failing call leaves every tensor untouched.
#include <algorithm>
#include <numeric>
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
void move_kept_rows(const cpu::PagedRows<scalar_t>& pool,     // the pools or the rectangle
                    const cpu::Tables& t, const Tensor& keep,  // keep (B, H, L) bool
                    const std::vector<int64_t>& old,           // [b * H + h] rows before
                    const std::vector<int64_t>& stay) {        // [b * H + h] rows before the 1st drop
  const int64_t H = t.H;
  const bool* kp = keep.const_data_ptr<bool>();
  const int64_t ks_b = keep.stride(0), ks_h = keep.stride(1), ks_r = keep.stride(2);
  int64_t moving = 0;  // rows that may move, over all heads
  for (size_t bh = 0; bh < old.size(); ++bh) moving += old[bh] - stay[bh];
  const int64_t per_head = old.empty() ? 0 : moving / static_cast<int64_t>(old.size());
  torch::stable::parallel_for(0, static_cast<int64_t>(old.size()), cpu::grain_for(2 * per_head * pool.D),
                              [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const bool* flags = kp + (bh / H) * ks_b + (bh % H) * ks_h;
      // Rows before the first dropped one stay where they are. After it dst < src at every step, so copying
      // forward never overwrites a row not yet read.
      cpu::RowWalker<scalar_t> src(pool, t, bh, stay[bh]), dst(pool, t, bh, stay[bh]);
      const int64_t D = pool.D;
      for (int64_t r = stay[bh] + 1; r < old[bh]; ++r) {
        src.next();
        if (!flags[r * ks_r]) continue;
        std::copy_n(src.key(), D, dst.key());  // distinct rows (dst < src): they never overlap
        std::copy_n(src.value(), D, dst.value());
        dst.next();
      }
    }
  });
}

}  // namespace

namespace cpu {

void compact_rows(const char* op, const paged::Tables& t, Tensor& key_pages, Tensor& value_pages,
                  const paged::Pool& key_pool, const paged::Pool& value_pool, const Tensor& keep) {
  const int64_t H = t.H, L = keep.size(2), BH = t.B * t.H;

  // 1. lengths in [0, M * S], free_count in [0, P]; 2. keep covers every row; 3. used page ids in [0, P).
  std::vector<int64_t> old;
  int64_t free = 0;
  raise_for_status(op, check_state(t, old, free));
  if (BH > 0 && *std::max_element(old.begin(), old.end()) > L) raise_for_status(op, kStatusKeepTooShort);
  if (!used_ids_ok(t, old)) raise_for_status(op, kStatusBadPageId);

  // Kept rows of each head, and its rows before the first dropped one (they do not move).
  std::vector<int64_t> next(static_cast<size_t>(BH), 0), stay(static_cast<size_t>(BH), 0);
  const bool* kp = keep.const_data_ptr<bool>();
  const int64_t ks_b = keep.stride(0), ks_h = keep.stride(1), ks_r = keep.stride(2);
  const int64_t mean_rows = BH > 0 ? std::accumulate(old.begin(), old.end(), int64_t{0}) / BH : 0;
  torch::stable::parallel_for(0, BH, grain_for(mean_rows), [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const bool* flags = kp + (bh / H) * ks_b + (bh % H) * ks_h;
      int64_t kept = 0, first_drop = old[bh];
      for (int64_t r = 0; r < old[bh]; ++r) {
        const bool f = flags[r * ks_r];
        kept += f;
        if (!f && first_drop == old[bh]) first_drop = r;
      }
      next[bh] = kept;
      stay[bh] = first_drop;
    }
  });
  // 4. the emptied pages fit on the free stack.
  raise_for_status(op, check_give_back(t, old, next, free));

  if (key_pages.size(-1) > 0) {
    ATTNGATE_DISPATCH_FLOATING_TYPES(key_pages.scalar_type(), "compact_rows_cpu", [&] {
      const PagedRows<scalar_t> pool(key_pages, value_pages, key_pool, value_pool);
      move_kept_rows<scalar_t>(pool, t, keep, old, stay);
    });
  }
  give_back(t, old, next, free);
}

}  // namespace cpu

namespace {

void paged_compact_kv_cpu(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                          Tensor& free_pages, Tensor& free_count, const Tensor& keep) {
  check_paged_compact_args(key_pages, value_pages, page_table, lengths, free_pages, free_count, keep);
  cpu::compact_rows("paged_compact_kv_", paged::make_tables(key_pages, page_table, lengths, free_pages, free_count),
                    key_pages, value_pages, paged::make_pool(key_pages), paged::make_pool(value_pages), keep);
}

}  // namespace

ATTNGATE_IMPL(CPU, paged_compact_kv_, paged_compact_kv_cpu);

}  // namespace attngate
