// Host helpers shared by the CPU kernels of the paged storage ops: strided access to the page table, lengths and
// free stack, the value checks every op starts with, and the release of emptied pages (layout:
// attngate_ext/ops/paged.py; semantics: attngate_ext/ops/paged_reference.py).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "checks.h"

namespace attngate::cpu {

inline int64_t pages_for(int64_t rows, int64_t page_size) { return (rows + page_size - 1) / page_size; }

// The int32 bookkeeping of one layer with any strides: page_table (B, H, M), lengths (B, H), free_pages (P),
// free_count (1).
struct PagedTables {
  int32_t* table;
  int64_t t_sb, t_sh, t_sm;
  int32_t* len;
  int64_t l_sb, l_sh;
  int32_t* free_pages;
  int64_t f_s;
  int32_t* free_count;
  int64_t B, H, M, P, S;

  PagedTables(const at::Tensor& key_pages, at::Tensor& page_table, at::Tensor& lengths, at::Tensor& free_pages_t,
              at::Tensor& free_count_t)
      : table(page_table.data_ptr<int32_t>()),
        t_sb(page_table.stride(0)),
        t_sh(page_table.stride(1)),
        t_sm(page_table.stride(2)),
        len(lengths.data_ptr<int32_t>()),
        l_sb(lengths.stride(0)),
        l_sh(lengths.stride(1)),
        free_pages(free_pages_t.data_ptr<int32_t>()),
        f_s(free_pages_t.stride(0)),
        free_count(free_count_t.data_ptr<int32_t>()),
        B(page_table.size(0)),
        H(page_table.size(1)),
        M(page_table.size(2)),
        P(key_pages.size(0)),
        S(key_pages.size(1)) {}

  int32_t& entry(int64_t bh, int64_t i) const { return table[(bh / H) * t_sb + (bh % H) * t_sh + i * t_sm]; }
  int32_t& length(int64_t bh) const { return len[(bh / H) * l_sb + (bh % H) * l_sh]; }
  int32_t& free_at(int64_t i) const { return free_pages[i * f_s]; }
  bool id_ok(int64_t id) const { return id >= 0 && id < P; }
};

// First checks of every op, in the reference's order: lengths in [0, M * S] (read into `old`, as int64 by
// b * H + h), then free_count in [0, P] (read into `free`). Returns the status bits.
inline int32_t check_state(const PagedTables& t, std::vector<int64_t>& old, int64_t& free) {
  const int64_t BH = t.B * t.H;
  old.resize(static_cast<size_t>(BH));
  int32_t status = 0;
  for (int64_t bh = 0; bh < BH; ++bh) {
    old[bh] = t.length(bh);
    if (old[bh] < 0 || old[bh] > t.M * t.S) status |= kStatusLengthOutOfRange;
  }
  free = *t.free_count;
  if (free < 0 || free > t.P) status |= kStatusFreeCountOutOfRange;
  return status;
}

// Whether every page a head uses ([0, ceil(old / S)) of its table row) has an id in [0, P).
inline bool used_ids_ok(const PagedTables& t, const std::vector<int64_t>& old) {
  for (int64_t bh = 0; bh < static_cast<int64_t>(old.size()); ++bh) {
    for (int64_t i = 0, n = pages_for(old[bh], t.S); i < n; ++i) {
      if (!t.id_ok(t.entry(bh, i))) return false;
    }
  }
  return true;
}

// Pages that shrinking every head from old to next rows empties; pushing them must not overflow free_pages.
inline int32_t check_give_back(const PagedTables& t, const std::vector<int64_t>& old, const std::vector<int64_t>& next,
                               int64_t free) {
  int64_t freed = 0;
  for (size_t i = 0; i < old.size(); ++i) freed += pages_for(old[i], t.S) - pages_for(next[i], t.S);
  return free + freed > t.P ? kStatusFreeCountOutOfRange : 0;
}

// Pushes pages [ceil(next / S), ceil(old / S)) of every head, head by head in page order, onto the free stack,
// sets their table entries to -1 and writes the new lengths and free_count.
inline void give_back(const PagedTables& t, const std::vector<int64_t>& old, const std::vector<int64_t>& next,
                      int64_t free) {
  int64_t top = free;
  for (int64_t bh = 0; bh < static_cast<int64_t>(old.size()); ++bh) {
    for (int64_t i = pages_for(next[bh], t.S), end = pages_for(old[bh], t.S); i < end; ++i) {
      t.free_at(top++) = t.entry(bh, i);
      t.entry(bh, i) = -1;
    }
    t.length(bh) = static_cast<int32_t>(next[bh]);
  }
  *t.free_count = static_cast<int32_t>(top);
}

// Rows of the key and value pools (P, S, D) addressed by (page, slot).
template <typename scalar_t>
struct PagedRows {
  scalar_t* k;
  scalar_t* v;
  int64_t k_sp, k_ss, v_sp, v_ss, D;

  PagedRows(at::Tensor& key_pages, at::Tensor& value_pages)
      : k(key_pages.data_ptr<scalar_t>()),
        v(value_pages.data_ptr<scalar_t>()),
        k_sp(key_pages.stride(0)),
        k_ss(key_pages.stride(1)),
        v_sp(value_pages.stride(0)),
        v_ss(value_pages.stride(1)),
        D(key_pages.size(2)) {}

  scalar_t* key_row(int64_t page, int64_t slot) const { return k + page * k_sp + slot * k_ss; }
  scalar_t* value_row(int64_t page, int64_t slot) const { return v + page * v_sp + slot * v_ss; }

  // Copies logical row `src` of head bh onto its logical row `dst` (distinct rows: they never overlap).
  void move(const PagedTables& t, int64_t bh, int64_t src, int64_t dst) const {
    const int64_t sp = t.entry(bh, src / t.S), dp = t.entry(bh, dst / t.S);
    std::copy_n(key_row(sp, src % t.S), D, key_row(dp, dst % t.S));
    std::copy_n(value_row(sp, src % t.S), D, value_row(dp, dst % t.S));
  }
};

}  // namespace attngate::cpu
