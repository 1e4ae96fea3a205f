// CPU kernel of attngate::paged_remove_rows_: deletes the listed rows of each head by moving its last surviving
// rows into the holes, O(K) row moves per head (semantics: attngate_ext/ops/paged_reference.py).
//
// With n rows and r deletions the new length is m = n - r; the holes are the deleted rows below m (ascending) and
// the movers the surviving rows of [m, n) (ascending), as many as there are holes. Sources (>= m) and destinations
// (< m) never meet, so the moves of a head are independent.
#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "cpu/paged_storage.h"
#include "dispatch.h"
#include "paged_storage_checks.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

// Sorted deleted rows of one head; holes are the first `holes` of them (those below the new length).
struct HeadRemoval {
  std::vector<int64_t> gone;
  int64_t holes = 0;
};

// The surviving rows of [m, n), ascending, given the sorted deleted rows `high` of [m, n): the j-th mover skips
// every deleted row at or below it. O(len(high) + movers).
template <typename Fn>
void for_each_mover(int64_t m, const int64_t* high, int64_t n_high, int64_t movers, Fn&& fn) {
  int64_t x = m, i = 0;
  for (int64_t j = 0; j < movers; ++j, ++x) {
    while (i < n_high && high[i] == x) ++i, ++x;
    fn(j, x);
  }
}

template <typename scalar_t>
void paged_remove_moves(Tensor& key_pages, Tensor& value_pages, const cpu::Tables& t,
                        const std::vector<HeadRemoval>& plans, const std::vector<int64_t>& next,
                        int64_t K) {  // rows listed per head: at most K moves each
  const cpu::PagedRows<scalar_t> pool(key_pages, value_pages, paged::make_pool(key_pages),
                                      paged::make_pool(value_pages));
  torch::stable::parallel_for(0, static_cast<int64_t>(plans.size()), cpu::grain_for(2 * K * key_pages.size(2)),
                              [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const HeadRemoval& p = plans[bh];
      const int64_t n_gone = static_cast<int64_t>(p.gone.size());
      for_each_mover(next[bh], p.gone.data() + p.holes, n_gone - p.holes, p.holes,
                     [&](int64_t j, int64_t src) { pool.move(t, bh, src, p.gone[j]); });
    }
  });
}

void paged_remove_rows_cpu(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                           Tensor& free_pages, Tensor& free_count, const Tensor& rows) {
  check_paged_remove_args(key_pages, value_pages, page_table, lengths, free_pages, free_count, rows);
  const cpu::Tables t = paged::make_tables(key_pages, page_table, lengths, free_pages, free_count);
  const int64_t H = t.H, K = rows.size(2), BH = t.B * t.H;
  const char* op = "paged_remove_rows_";

  // 1. lengths in [0, M * S], free_count in [0, P].
  std::vector<int64_t> old;
  int64_t free = 0;
  raise_for_status(op, cpu::check_state(t, old, free));

  // 2. rows: distinct live rows of their head (negative entries ignored). O(K log K) per head.
  std::vector<HeadRemoval> plans(static_cast<size_t>(BH));
  std::vector<int64_t> next(old);
  const int32_t* rp = rows.const_data_ptr<int32_t>();
  const int64_t rs_b = rows.stride(0), rs_h = rows.stride(1), rs_k = rows.stride(2);  // read once
  int32_t status = 0;
  for (int64_t bh = 0; bh < BH; ++bh) {
    HeadRemoval& p = plans[bh];
    const int32_t* head_rows = rp + (bh / H) * rs_b + (bh % H) * rs_h;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = head_rows[k * rs_k];
      if (r >= old[bh]) status |= kStatusBadRow;
      if (r >= 0) p.gone.push_back(r);
    }
    std::sort(p.gone.begin(), p.gone.end());
    if (std::adjacent_find(p.gone.begin(), p.gone.end()) != p.gone.end()) status |= kStatusBadRow;
    next[bh] = old[bh] - static_cast<int64_t>(p.gone.size());
    p.holes = std::lower_bound(p.gone.begin(), p.gone.end(), next[bh]) - p.gone.begin();
  }
  raise_for_status(op, status);
  // 3. used page ids in [0, P); 4. the emptied pages fit on the free stack.
  if (!cpu::used_ids_ok(t, old)) raise_for_status(op, kStatusBadPageId);
  raise_for_status(op, cpu::check_give_back(t, old, next, free));

  if (key_pages.size(2) > 0) {
    ATTNGATE_DISPATCH_FLOATING_TYPES(key_pages.scalar_type(), "paged_remove_rows_cpu", [&] {
      paged_remove_moves<scalar_t>(key_pages, value_pages, t, plans, next, rows.size(2));
    });
  }
  cpu::give_back(t, old, next, free);
}

}  // namespace

ATTNGATE_IMPL(CPU, paged_remove_rows_, paged_remove_rows_cpu);

}  // namespace attngate
