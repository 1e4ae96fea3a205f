// Host helpers shared by the CPU storage kernels (append, compaction, row removal) of both cache layouts
// (csrc/kv_tables.h): the value checks every op starts with, the release of emptied pages and row moves (semantics:
// attngate_ext/ops/paged_reference.py). A rectangle cache owns its pages: it has no free stack to check or push to.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "kv_tables.h"
#include "stable_api.h"

namespace attngate::cpu {

using paged::pages_for;
using paged::Pool;
using paged::Tables;

// First checks of every op, in the reference's order: lengths in [0, M * S] (read into `old`, as int64 by
// b * H + h), then free_count in [0, P] (read into `free`; 0 without a free stack). Returns the status bits.
inline int32_t check_state(const Tables& t, std::vector<int64_t>& old, int64_t& free) {
  const int64_t BH = t.B * t.H;
  old.resize(static_cast<size_t>(BH));
  int32_t status = 0;
  for (int64_t bh = 0; bh < BH; ++bh) {
    old[bh] = *t.length(bh);
    if (old[bh] < 0 || old[bh] > t.M * t.S) status |= kStatusLengthOutOfRange;
  }
  free = t.free_count != nullptr ? *t.free_count : 0;
  if (free < 0 || free > t.P) status |= kStatusFreeCountOutOfRange;
  return status;
}

// Whether every page a head uses ([0, ceil(old / S)) of its table row) has an id in [0, P).
inline bool used_ids_ok(const Tables& t, const std::vector<int64_t>& old) {
  if (t.owns_pages()) return true;
  for (int64_t bh = 0; bh < static_cast<int64_t>(old.size()); ++bh) {
    for (int64_t i = 0, n = pages_for(old[bh], t.S); i < n; ++i) {
      if (!t.id_ok(*t.entry(bh, i))) return false;
    }
  }
  return true;
}

// Pages that shrinking every head from old to next rows empties; pushing them must not overflow free_pages.
inline int32_t check_give_back(const Tables& t, const std::vector<int64_t>& old, const std::vector<int64_t>& next,
                               int64_t free) {
  if (t.owns_pages()) return 0;
  int64_t freed = 0;
  for (size_t i = 0; i < old.size(); ++i) freed += pages_for(old[i], t.S) - pages_for(next[i], t.S);
  return free + freed > t.P ? kStatusFreeCountOutOfRange : 0;
}

// Pushes pages [ceil(next / S), ceil(old / S)) of every head, head by head in page order, onto the free stack,
// sets their table entries to -1 and writes the new lengths and free_count (a rectangle: the lengths only).
inline void give_back(const Tables& t, const std::vector<int64_t>& old, const std::vector<int64_t>& next,
                      int64_t free) {
  if (t.owns_pages()) {
    for (int64_t bh = 0; bh < static_cast<int64_t>(next.size()); ++bh) *t.length(bh) = static_cast<int32_t>(next[bh]);
    return;
  }
  int64_t top = free;
  for (int64_t bh = 0; bh < static_cast<int64_t>(old.size()); ++bh) {
    for (int64_t i = pages_for(next[bh], t.S), end = pages_for(old[bh], t.S); i < end; ++i) {
      *t.free_at(top++) = *t.entry(bh, i);
      *t.entry(bh, i) = -1;
    }
    *t.length(bh) = static_cast<int32_t>(next[bh]);
  }
  *t.free_count = static_cast<int32_t>(top);
}


// Rows of the key and value pools addressed by (page, slot): a paged pool (P, S, D) or a rectangle (B, H, C, D).
template <typename scalar_t>
struct PagedRows {
  scalar_t* k;
  scalar_t* v;
  Pool kp, vp;
  int64_t D;

  PagedRows(Tensor& key_pages, Tensor& value_pages, const Pool& key_pool, const Pool& value_pool)
      : k(key_pages.mutable_data_ptr<scalar_t>()),
        v(value_pages.mutable_data_ptr<scalar_t>()),
        kp(key_pool),
        vp(value_pool),
        D(key_pages.size(-1)) {}

  scalar_t* key_row(int64_t page, int64_t slot) const { return k + kp.at(page, slot); }
  scalar_t* value_row(int64_t page, int64_t slot) const { return v + vp.at(page, slot); }

  // Copies the key and value row at (sp, ss) onto (dp, ds) (distinct rows: they never overlap).
  void copy(int64_t sp, int64_t ss, int64_t dp, int64_t ds) const {
    std::copy_n(key_row(sp, ss), D, key_row(dp, ds));
    std::copy_n(value_row(sp, ss), D, value_row(dp, ds));
  }

  // Copies logical row `src` of head bh onto its logical row `dst`.
  void move(const Tables& t, int64_t bh, int64_t src, int64_t dst) const {
    copy(t.page(bh, src / t.S), src % t.S, t.page(bh, dst / t.S), dst % t.S);
  }
};

// Walks the logical rows of one head in order, from `row` on: the key and value row of each, with one page-table
// read and one address computation per page, none per row. The page is looked up only when a row of it is asked
// for, so walking one past the last row reads nothing.
template <typename scalar_t>
class RowWalker {
 public:
  RowWalker(const PagedRows<scalar_t>& pool, const Tables& t, int64_t bh, int64_t row)
      : pool_(&pool), t_(&t), bh_(bh), index_(row / t.S), slot_(row % t.S) {}

  scalar_t* key() {
    refresh();
    return key_page_ + slot_ * pool_->kp.row_stride;
  }
  scalar_t* value() {
    refresh();
    return value_page_ + slot_ * pool_->vp.row_stride;
  }
  void next() {
    if (++slot_ == t_->S) slot_ = 0, ++index_;
  }

 private:
  void refresh() {
    if (index_ == loaded_) return;
    const int64_t page = t_->page(bh_, index_);
    key_page_ = pool_->k + pool_->kp.page_offset(page);
    value_page_ = pool_->v + pool_->vp.page_offset(page);
    loaded_ = index_;
  }

  const PagedRows<scalar_t>* pool_;
  const Tables* t_;
  int64_t bh_, index_, slot_, loaded_ = -1;
  scalar_t* key_page_ = nullptr;
  scalar_t* value_page_ = nullptr;
};

}  // namespace attngate::cpu
