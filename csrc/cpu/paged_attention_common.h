// Host-side pieces shared by the CPU paged attention ops: row addressing of the paged cache, the dynamic item
// scheduler and the merge of split partial states.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/paged_attention_isa.h"
#include "kv_tables.h"
#include "stable_api.h"

namespace attngate::cpu::paged {

constexpr float kLog2e = 1.4426950408889634f;

inline RowType row_type(ScalarType t) {
  return t == kHalf ? RowType::kF16 : t == kBFloat16 ? RowType::kBF16 : RowType::kF32;
}

// Byte addressing of a head's rows through csrc/kv_tables.h: key_pages / value_pages (P, S, D) through page_table
// (B, H, M), or a rectangle cache (B, H, C, D) (a head is one page). Page ids were validated before any kernel runs.
struct PagedRows {
  const char* k;
  const char* v;
  ::attngate::paged::Tables t;
  ::attngate::paged::Pool kp, vp;  // element offsets
  int64_t elem;                    // bytes per element

  PagedRows(const Tensor& key_pages, const Tensor& value_pages, const ::attngate::paged::Tables& tables,
            const ::attngate::paged::Pool& key_pool, const ::attngate::paged::Pool& value_pool)
      : k(static_cast<const char*>(key_pages.data_ptr())),
        v(static_cast<const char*>(value_pages.data_ptr())),
        t(tables),
        kp(key_pool),
        vp(value_pool),
        elem(static_cast<int64_t>(key_pages.element_size())) {}

  // Appends the head's rows [r, r_end) to the tile (all visible), stopping when it is full; returns the next row.
  int64_t fill(int64_t b, int64_t h, int64_t r, int64_t r_end, KeyTile& tile) const {
    const int64_t bh = b * t.H + h, S = t.S;
    const int64_t k_row = kp.row_stride * elem, v_row = vp.row_stride * elem;
    while (r < r_end && tile.n < kTileKeys) {
      const int64_t page = t.page(bh, r / S), slot = r % S;
      const int64_t n = std::min({S - slot, r_end - r, static_cast<int64_t>(kTileKeys - tile.n)});
      const char* kr = k + kp.at(page, slot) * elem;
      const char* vr = v + vp.at(page, slot) * elem;
      for (int64_t i = 0; i < n; ++i, ++tile.n) {
        tile.k[tile.n] = kr + i * k_row;
        tile.v[tile.n] = vr + i * v_row;
        tile.lo[tile.n] = std::numeric_limits<int32_t>::min();
        tile.hi[tile.n] = std::numeric_limits<int32_t>::max();
      }
      r += n;
    }
    return r;
  }
};

// Dense (B, H, N, D) rows (extra rows, the chunk's keys and values) by byte offsets.
struct DenseRows {
  const char* k;
  const char* v;
  int64_t k_b, k_h, k_n, v_b, v_h, v_n;

  DenseRows() : k(nullptr), v(nullptr), k_b(0), k_h(0), k_n(0), v_b(0), v_h(0), v_n(0) {}
  DenseRows(const Tensor& key, const Tensor& value)
      : k(static_cast<const char*>(key.data_ptr())),
        v(static_cast<const char*>(value.data_ptr())),
        k_b(key.stride(0) * key.element_size()),
        k_h(key.stride(1) * key.element_size()),
        k_n(key.stride(2) * key.element_size()),
        v_b(value.stride(0) * value.element_size()),
        v_h(value.stride(1) * value.element_size()),
        v_n(value.stride(2) * value.element_size()) {}

  void push(int64_t b, int64_t h, int64_t i, int32_t lo, int32_t hi, KeyTile& tile) const {
    tile.k[tile.n] = k + b * k_b + h * k_h + i * k_n;
    tile.v[tile.n] = v + b * v_b + h * v_h + i * v_n;
    tile.lo[tile.n] = lo;
    tile.hi[tile.n] = hi;
    ++tile.n;
  }
};

// Work below which an op runs on the calling thread: starting a parallel region costs microseconds, more than a
// decode step of a short cache.
constexpr int64_t kSerialBytes = 256 * 1024;       // decode: K/V bytes read
constexpr int64_t kSerialFlops = 4 * 1024 * 1024;  // prefill

// Runs fn(item, scratch) for items [0, n) on torch's intra-op threads (on the calling thread when `serial`); each
// thread builds one scratch with init() and pulls items from a shared counter, so list the heaviest items first.
// The result of an item must not depend on the thread that ran it (it does not: items write disjoint outputs).
template <class Init, class Fn>
void parallel_items(int64_t n, bool serial, const Init& init, const Fn& fn) {
  if (n <= 0) return;
  const int64_t threads =
      serial ? 1 : std::max<int64_t>(1, std::min<int64_t>(static_cast<int64_t>(torch::stable::get_num_threads()), n));
  if (threads == 1) {
    auto scratch = init();
    for (int64_t i = 0; i < n; ++i) fn(i, scratch);
    return;
  }
  std::atomic<int64_t> next{0};
  torch::stable::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto scratch = init();
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i, scratch);
  });
}

// Weight of each of ns split partial states (running max m_s) in their merge: w_s = 2^(m_s - max_s m_s), 0 for a
// split that saw nothing. Returns the number of splits that saw something.
inline int split_weights(const float* m, int64_t m_stride, int64_t ns, float* w) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < ns; ++s) top = std::max(top, m[s * m_stride]);
  int seen = 0;
  for (int64_t s = 0; s < ns; ++s) {
    const float ms = m[s * m_stride];
    w[s] = ms == -std::numeric_limits<float>::infinity() ? 0.f : std::exp2(ms - top);
    seen += ms != -std::numeric_limits<float>::infinity();
  }
  return seen;
}

}  // namespace attngate::cpu::paged
