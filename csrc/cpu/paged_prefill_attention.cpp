// CPU kernel of attngate::paged_prefill_attention: a chunk of T queries over each KV head's paged rows, the extra
// rows and the chunk itself under the eviction rule, flash style.
//
// Work item = (b, KV head, tile of the group's query heads, tile of queries[, split of the key stream]). An item
// stacks its query heads and queries into Mq rows and walks one stream of keys in tiles of kTileKeys rows:
//   paged rows [0, len)           visible to every query
//   extra rows e                  visible to queries t <= extra_until[e]; rows no query of the item sees are skipped
//   chunk keys j <= last query    visible to t in [j, hi_j]: hi_j = j (padding), j + window - 1 (evicted), or
//                                 unbounded (kept); keys that no query of the item sees are skipped, so evicted
//                                 tokens cost nothing once they left the window
// Each key's visibility is the interval [lo, hi] of query positions, tested in the softmax only for tiles that
// hold a key not visible to the whole item. Rows are addressed in place (pages, chunk, extra): the only copies are
// the float conversions of one tile of 16-bit rows. Items are listed heaviest first and pulled dynamically by the
// threads; when there are too few of them the key stream is split and the partial states merged in split order.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "cpu/paged_attention_common.h"
#include "cpu/paged_attention_kernels.h"
#include "dispatch.h"
#include "paged_attention_checks.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate::cpu {
namespace {

using paged::KeyTile;
using paged::kTileKeys;
using paged::PrefillState;

constexpr int64_t kRowsPerItem = 96;      // query rows (heads x queries) per item, before rounding to the width
constexpr int64_t kItemStateFloats = 8192;  // bound on D x Mq per item (its transposed queries and output)
constexpr int64_t kMinSplitKeys = 256;
constexpr int64_t kItemsPerThread = 4;
constexpr int32_t kAll = std::numeric_limits<int32_t>::max();

struct PrefillProblem {
  int64_t B, H, G, T, D, E;
  int64_t gt, tq, Mq, ngt, nqt, ns;  // heads and queries per item, rows, head tiles, query tiles, splits
  bool serial;                       // small enough for the calling thread alone
  paged::RowType type;
  float scale;  // scale * log2(e)
  float cap;    // softcap * log2(e), 0: off
  const std::vector<int64_t>* lens;
  paged::PagedRows pages;
  paged::DenseRows chunk, extra;
  const int32_t* until;  // null: every extra row visible to every query
  int64_t u_b, u_h, u_e;
  const bool* keep;
  int64_t k_b, k_h, k_t;
  const bool* valid;  // null: no padding
  int64_t v_b, v_t;
  int64_t window;
};

struct Item {
  int64_t b, h, g0, gn, t0, t1;  // heads [g0, g0 + gn) of the group, queries [t0, t1]
};

Item item_of(const PrefillProblem& p, int64_t index) {
  // Query tiles vary slowest and go last-first: the late (heaviest) tiles of every head are pulled first.
  const int64_t per_qt = p.B * p.H * p.ngt;
  const int64_t qi = p.nqt - 1 - index / per_qt, rest = index % per_qt;
  const int64_t gi = rest % p.ngt, bh = rest / p.ngt;
  Item it{bh / p.H, bh % p.H, gi * p.gt, std::min(p.gt, p.G - gi * p.gt), qi * p.tq, 0};
  it.t1 = std::min(p.T, it.t0 + p.tq) - 1;
  return it;
}

// Raw stream of an item: paged rows [0, len), extra rows [len, len + E), chunk keys [len + E, len + E + t1 + 1).
int64_t raw_length(const PrefillProblem& p, const Item& it) { return (*p.lens)[it.b * p.H + it.h] + p.E + it.t1 + 1; }

// Fills the tile with the visible keys of raw positions [r, r_end); returns the next position.
int64_t fill_tile(const PrefillProblem& p, const Item& it, int64_t r, int64_t r_end, KeyTile& tile) {
  tile.n = 0;
  tile.masked = false;
  const int64_t b = it.b, h = it.h, len = (*p.lens)[b * p.H + h];
  if (r < len) r = p.pages.fill(b, h, r, std::min(r_end, len), tile);
  for (; r < r_end && r >= len && r < len + p.E && tile.n < kTileKeys; ++r) {
    const int64_t e = r - len;
    const int32_t hi = p.until != nullptr ? p.until[b * p.u_b + h * p.u_h + e * p.u_e] : kAll;
    if (hi < it.t0) continue;
    p.extra.push(b, h, e, std::numeric_limits<int32_t>::min(), hi, tile);
    tile.masked |= hi < it.t1;
  }
  for (; r < r_end && r >= len + p.E && tile.n < kTileKeys; ++r) {
    const int64_t j = r - len - p.E;
    int64_t hi = kAll;
    if (p.valid != nullptr && !p.valid[b * p.v_b + j * p.v_t]) {
      hi = j;
    } else if (!p.keep[b * p.k_b + h * p.k_h + j * p.k_t]) {
      hi = std::min<int64_t>(j + p.window - 1, kAll);
    }
    if (hi < it.t0) continue;
    p.chunk.push(b, h, j, static_cast<int32_t>(j), static_cast<int32_t>(hi), tile);
    tile.masked |= j > it.t0 || hi < it.t1;
  }
  return r;
}

struct Scratch {
  std::vector<float> qt, st, alpha, kf, vf, zeros, part;
  std::vector<int32_t> pos;
  KeyTile tile;
};

// Runs item `index` (split `split`) into ot (D, Mq), m (Mq), l (Mq).
template <typename scalar_t>
void run_item(const PrefillProblem& p, const Tensor& query, int64_t index, int64_t split, float* ot, float* m, float* l,
              Scratch& sc) {
  const Item it = item_of(p, index);
  const int64_t Mq = p.Mq, D = p.D, nq = it.t1 - it.t0 + 1;
  const scalar_t* q = query.const_data_ptr<scalar_t>();
  const cpu::Strides3 qs = cpu::strides3(query);
  for (int64_t row = 0; row < Mq; ++row) {
    const int64_t g = row / p.tq, i = row % p.tq;
    sc.pos[row] = static_cast<int32_t>(it.t1);  // padding rows: computed like the last query, never written
    for (int64_t d = 0; d < D; ++d) sc.qt[d * Mq + row] = 0.f;
    if (g >= it.gn || i >= nq) continue;
    sc.pos[row] = static_cast<int32_t>(it.t0 + i);
    const scalar_t* src = q + qs.at(it.b, it.h * p.G + it.g0 + g, it.t0 + i);
    for (int64_t d = 0; d < D; ++d) sc.qt[d * Mq + row] = static_cast<float>(src[d]) * p.scale;
  }
  std::fill(ot, ot + D * Mq, 0.f);
  std::fill(m, m + Mq, -std::numeric_limits<float>::infinity());
  std::fill(l, l + Mq, 0.f);
  PrefillState st{static_cast<int>(D), static_cast<int>(Mq), sc.qt.data(), sc.pos.data(), ot, m, l, sc.st.data(),
                  sc.alpha.data(), sc.kf.data(), sc.vf.data(), sc.zeros.data(), static_cast<int>(sc.zeros.size()), p.cap};
  const int64_t n = raw_length(p, it), chunk = (n + p.ns - 1) / p.ns;
  int64_t r = std::min(n, split * chunk);
  const int64_t r_end = std::min(n, r + chunk);
  const paged::Kernels& kernels = paged::kernels();
  while (r < r_end) {
    r = fill_tile(p, it, r, r_end, sc.tile);
    kernels.prefill_tile(sc.tile, p.type, st);
  }
}

template <typename scalar_t>
void prefill(const PrefillProblem& p, const Tensor& query, Tensor& out) {
  const int64_t Mq = p.Mq, D = p.D, items = p.B * p.H * p.ngt * p.nqt, ns = p.ns;
  const int64_t per_part = Mq * (D + 2);  // ot (D, Mq), m (Mq), l (Mq)
  auto init = [&] {
    const int64_t dp = (D + paged::kMaxWidth - 1) / paged::kMaxWidth * paged::kMaxWidth;
    Scratch sc;
    sc.qt.assign(static_cast<size_t>(D * Mq), 0.f);
    sc.st.assign(static_cast<size_t>(kTileKeys * Mq), 0.f);
    sc.alpha.assign(static_cast<size_t>(Mq), 0.f);
    sc.kf.assign(static_cast<size_t>(kTileKeys * dp), 0.f);
    sc.vf.assign(static_cast<size_t>(kTileKeys * dp), 0.f);
    sc.zeros.assign(static_cast<size_t>(dp), 0.f);
    sc.pos.assign(static_cast<size_t>(Mq), 0);
    sc.part.assign(static_cast<size_t>(per_part), 0.f);
    sc.tile.n = 0;
    return sc;
  };
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t o_h = p.T * D, o_b = p.G * p.H * o_h;
  // Normalises a state (m unused) into the output rows of its item.
  auto write = [&](const Item& it, const float* ot, const float* l) {
    for (int64_t g = 0; g < it.gn; ++g) {
      for (int64_t i = 0; i <= it.t1 - it.t0; ++i) {
        const int64_t row = g * p.tq + i;
        const float inv = l[row] > 0.f ? 1.f / l[row] : 0.f;
        scalar_t* dst = o + it.b * o_b + (it.h * p.G + it.g0 + g) * o_h + (it.t0 + i) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(ot[d * Mq + row] * inv);
      }
    }
  };
  if (ns == 1) {
    paged::parallel_items(items, p.serial, init, [&](int64_t index, Scratch& sc) {
      float* part = sc.part.data();
      run_item<scalar_t>(p, query, index, 0, part, part + D * Mq, part + D * Mq + Mq, sc);
      write(item_of(p, index), part, part + D * Mq + Mq);
    });
    return;
  }
  std::vector<float> parts(static_cast<size_t>(items * ns * per_part));
  paged::parallel_items(items * ns, p.serial, init, [&](int64_t task, Scratch& sc) {
    float* part = parts.data() + task * per_part;
    run_item<scalar_t>(p, query, task / ns, task % ns, part, part + D * Mq, part + D * Mq + Mq, sc);
  });
  // Merge on the calling thread: splits only happen with few items, so this is small.
  {
    std::vector<float> w(static_cast<size_t>(ns)), merged(static_cast<size_t>(per_part));
    for (int64_t index = 0; index < items; ++index) {
      const float* first = parts.data() + index * ns * per_part;
      std::fill(merged.begin(), merged.end(), 0.f);
      for (int64_t row = 0; row < Mq; ++row) {
        paged::split_weights(first + D * Mq + row, per_part, ns, w.data());
        for (int64_t s = 0; s < ns; ++s) {
          if (w[s] == 0.f) continue;
          const float* part = first + s * per_part;
          merged[D * Mq + Mq + row] += w[s] * part[D * Mq + Mq + row];
          for (int64_t d = 0; d < D; ++d) merged[d * Mq + row] += w[s] * part[d * Mq + row];
        }
      }
      write(item_of(p, index), merged.data(), merged.data() + D * Mq + Mq);
    }
  }
}

}  // namespace

Tensor paged_prefill_attention_cpu(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                   const Tensor& page_table, const Tensor& lengths, const Tensor& key,
                                   const Tensor& value, const Tensor& keep, const std::optional<Tensor>& valid,
                                   int64_t window, double scale, const std::optional<Tensor>& extra_key,
                                   const std::optional<Tensor>& extra_value, const std::optional<Tensor>& extra_until,
                                   double softcap) {
  constexpr const char* op = "paged_prefill_attention";
  check_paged_prefill_attention_args(query, key_pages, value_pages, page_table, lengths, key, value, keep, valid,
                                     window, scale, extra_key, extra_value, extra_until, softcap);
  Tensor out = empty_like_device(query.sizes(), query.scalar_type(), query);
  std::vector<int64_t> lens;
  raise_for_status(op, validate_paged_state_cpu(key_pages, page_table, lengths, lens));
  if (out.numel() == 0) return out;
  const int64_t B = page_table.size(0), H = page_table.size(1), G = query.size(1) / H, T = query.size(2);
  const int64_t D = key_pages.size(2), width = paged::kernels().width;
  const int64_t rows = std::clamp<int64_t>(kItemStateFloats / D, width, kRowsPerItem);
  const int64_t gt = std::min(G, rows), tq = std::clamp<int64_t>(rows / gt, 1, T);
  PrefillProblem p{B,
                   H,
                   G,
                   T,
                   D,
                   extra_key.has_value() ? extra_key->size(2) : 0,
                   gt,
                   tq,
                   (gt * tq + width - 1) / width * width,
                   (G + gt - 1) / gt,
                   (T + tq - 1) / tq,
                   1,
                   false,
                   paged::row_type(query.scalar_type()),
                   static_cast<float>(scale) * paged::kLog2e,
                   static_cast<float>(softcap) * paged::kLog2e,
                   &lens,
                   paged::PagedRows(key_pages, value_pages, ::attngate::paged::make_read_tables(key_pages, page_table, lengths),
                                    ::attngate::paged::make_pool(key_pages), ::attngate::paged::make_pool(value_pages)),
                   paged::DenseRows(key, value),
                   paged::DenseRows(),
                   nullptr,
                   0,
                   0,
                   0,
                   keep.mutable_data_ptr<bool>(),
                   keep.stride(0),
                   keep.stride(1),
                   keep.stride(2),
                   nullptr,
                   0,
                   0,
                   std::min<int64_t>(window, T + 1)};
  if (p.E > 0) p.extra = paged::DenseRows(*extra_key, *extra_value);
  if (extra_until.has_value()) {
    p.until = extra_until->mutable_data_ptr<int32_t>();
    p.u_b = extra_until->stride(0), p.u_h = extra_until->stride(1), p.u_e = extra_until->stride(2);
  }
  if (valid.has_value()) {
    p.valid = valid->mutable_data_ptr<bool>();
    p.v_b = valid->stride(0), p.v_t = valid->stride(1);
  }
  const int64_t items = B * H * p.ngt * p.nqt, threads = static_cast<int64_t>(torch::stable::get_num_threads());
  int64_t longest = 0, flops = 0;  // flops of the raw key streams: an upper bound
  for (int64_t i = 0; i < items; ++i) {
    longest = std::max(longest, raw_length(p, item_of(p, i)));
    flops += 4 * p.Mq * D * raw_length(p, item_of(p, i));
  }
  p.serial = flops < paged::kSerialFlops;
  if (!p.serial && items < kItemsPerThread * threads) {
    const int64_t want = (kItemsPerThread * threads + items - 1) / items;
    p.ns = std::max<int64_t>(1, std::min(want, longest / kMinSplitKeys));
  }
  ATTNGATE_DISPATCH_FLOATING_TYPES(query.scalar_type(), "paged_prefill_attention_cpu",
                                   [&] { prefill<scalar_t>(p, query, out); });
  return out;
}

ATTNGATE_IMPL(CPU, paged_prefill_attention, paged_prefill_attention_cpu);

}  // namespace attngate::cpu
