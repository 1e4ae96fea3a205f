// CPU kernel of attngate::paged_decode_attention and attngate::decode_attention (a rectangle cache: one page per head,
// csrc/kv_tables.h): one query token per head over each KV head's rows plus the valid extra rows.
//
// Memory-bound: every K/V row is read once per KV head and shared by the whole GQA group (decode_tile in
// paged_attention_tiles.inc). Work item = (b, KV head, split of its row stream); with few heads the stream is split
// along its length so that every thread stays busy, and the splits' online-softmax states are merged in a fixed
// order afterwards (the result does not depend on the thread count's scheduling).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/paged_attention_common.h"
#include "cpu/paged_attention_kernels.h"
#include "dispatch.h"
#include "paged_attention_checks.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate::cpu {
namespace {

using paged::DecodeState;
using paged::KeyTile;
using paged::kTileKeys;

constexpr int64_t kMinSplitRows = 256;  // below this a split costs more in set-up and merge than it saves
constexpr int64_t kItemsPerThread = 8;  // with dynamic scheduling, the imbalance is at most one item

struct DecodeProblem {
  int64_t B, H, G, D, dp, E, ns;
  bool serial;  // small enough for the calling thread alone
  paged::RowType type;
  float scale;  // scale * log2(e)
  float cap;    // softcap * log2(e), 0: off
  const std::vector<int64_t>* lens;
  paged::PagedRows pages;
  paged::DenseRows extra;
  const bool* extra_valid;  // null: all extra rows valid
  int64_t ev_b, ev_h, ev_e;
};

// The stream of (b, h): paged rows [0, len), then extra rows e at position len + e.
int64_t stream_length(const DecodeProblem& p, int64_t bh) { return (*p.lens)[bh] + p.E; }

void fill_tile(const DecodeProblem& p, int64_t b, int64_t h, int64_t& r, int64_t r_end, KeyTile& tile) {
  tile.n = 0;
  tile.masked = false;
  const int64_t len = (*p.lens)[b * p.H + h];
  if (r < len) r = p.pages.fill(b, h, r, std::min(r_end, len), tile);
  for (; r < r_end && r >= len && tile.n < kTileKeys; ++r) {
    const int64_t e = r - len;
    if (p.extra_valid == nullptr || p.extra_valid[b * p.ev_b + h * p.ev_h + e * p.ev_e]) {
      p.extra.push(b, h, e, 0, 0, tile);
    }
  }
}

struct Scratch {
  std::vector<float> q, s, zeros;
  KeyTile tiles[2];  // the tile being computed and the next one, whose rows are being prefetched
};

// Pages sit anywhere in memory, so the hardware prefetchers restart at every page: ask for the next tile's rows
// (into L2) while the current one is computed.
void prefetch_rows(const KeyTile& tile, int64_t row_bytes) {
  for (int j = 0; j < tile.n; ++j) {
    for (int64_t off = 0; off < row_bytes; off += 64) {
      __builtin_prefetch(static_cast<const char*>(tile.k[j]) + off, 0, 2);
      __builtin_prefetch(static_cast<const char*>(tile.v[j]) + off, 0, 2);
    }
  }
}

// Runs one (b, h, split) item into acc (G, dp), m (G), l (G).
template <typename scalar_t>
void run_item(const DecodeProblem& p, const scalar_t* query, int64_t q_b, int64_t q_h, int64_t item, float* acc,
              float* m, float* l, Scratch& sc) {
  const int64_t bh = item / p.ns, split = item % p.ns, b = bh / p.H, h = bh % p.H;
  const int64_t n = stream_length(p, bh), chunk = (n + p.ns - 1) / p.ns;
  int64_t r = std::min(n, split * chunk);
  const int64_t r_end = std::min(n, r + chunk);
  for (int64_t g = 0; g < p.G; ++g) {
    const scalar_t* src = query + b * q_b + (h * p.G + g) * q_h;
    for (int64_t d = 0; d < p.D; ++d) sc.q[g * p.dp + d] = static_cast<float>(src[d]) * p.scale;
  }
  std::fill(acc, acc + p.G * p.dp, 0.f);
  std::fill(m, m + p.G, -std::numeric_limits<float>::infinity());
  std::fill(l, l + p.G, 0.f);
  DecodeState st{static_cast<int>(p.D), static_cast<int>(p.G), static_cast<int>(p.dp), sc.q.data(), acc, m, l,
                 sc.s.data(), sc.zeros.data(), p.cap};
  const paged::Kernels& kernels = paged::kernels();
  const int64_t row_bytes = p.D * (p.type == paged::RowType::kF32 ? 4 : 2);
  int cur = 0;
  fill_tile(p, b, h, r, r_end, sc.tiles[cur]);
  while (sc.tiles[cur].n > 0) {
    fill_tile(p, b, h, r, r_end, sc.tiles[1 - cur]);
    prefetch_rows(sc.tiles[1 - cur], row_bytes);
    kernels.decode_tile(sc.tiles[cur], p.type, st);
    cur = 1 - cur;
  }
}

template <typename scalar_t>
void decode(const DecodeProblem& p, const Tensor& query, Tensor& out) {
  const scalar_t* q = query.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t G = p.G, dp = p.dp, D = p.D, items = p.B * p.H * p.ns;
  // Per item: acc (G, dp), then m (G), then l (G).
  const int64_t per_item = G * (dp + 2);
  std::vector<float> parts(static_cast<size_t>(items * per_item));
  auto init = [&] {
    Scratch sc;
    sc.q.assign(static_cast<size_t>(G * dp), 0.f);
    sc.s.assign(static_cast<size_t>(G * kTileKeys), 0.f);
    sc.zeros.assign(static_cast<size_t>(dp), 0.f);
    return sc;
  };
  const int64_t q_sb = query.stride(0), q_sh = query.stride(1);  // read once: each stride() calls into torch
  paged::parallel_items(items, p.serial, init, [&](int64_t item, Scratch& sc) {
    float* base = parts.data() + item * per_item;
    run_item<scalar_t>(p, q, q_sb, q_sh, item, base, base + G * dp, base + G * dp + G, sc);
  });
  // Merge the splits of every (b, h, g) in split order; zeros where no row was visible. On the calling thread: it
  // is small (B * Hq * ns * D multiply-adds), and a second parallel region costs more than it whenever the
  // cores are shared with other processes.
  {
    std::vector<float> w(static_cast<size_t>(p.ns)), row(static_cast<size_t>(D));
    for (int64_t bh = 0; bh < p.B * p.H; ++bh) {
      const float* first = parts.data() + bh * p.ns * per_item;
      for (int64_t g = 0; g < G; ++g) {
        paged::split_weights(first + G * dp + g, per_item, p.ns, w.data());
        float total = 0.f;
        std::fill(row.begin(), row.end(), 0.f);
        for (int64_t s = 0; s < p.ns; ++s) {
          if (w[s] == 0.f) continue;
          const float* part = first + s * per_item;
          total += w[s] * part[G * dp + G + g];
          for (int64_t d = 0; d < D; ++d) row[d] += w[s] * part[g * dp + d];
        }
        const float inv = total > 0.f ? 1.f / total : 0.f;
        scalar_t* dst = o + (bh * G + g) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(row[d] * inv);
      }
    }
  }
}

}  // namespace

void decode_attention_out(const ::attngate::paged::Tables& t, const Tensor& key_pages, const Tensor& value_pages,
                          const ::attngate::paged::Pool& key_pool, const ::attngate::paged::Pool& value_pool,
                          const Tensor& query, double scale, double softcap, const std::optional<Tensor>& extra_key,
                          const std::optional<Tensor>& extra_value, const std::optional<Tensor>& extra_valid,
                          Tensor& out, const char* op) {
  std::vector<int64_t> lens;
  raise_for_status(op, validate_state_cpu(t, lens));
  if (out.numel() == 0) return;
  const int64_t B = t.B, H = t.H, D = key_pages.size(-1);
  const int64_t E = extra_key.has_value() ? extra_key->size(2) : 0;
  DecodeProblem p{B, H, query.size(1) / H, D, (D + paged::kMaxWidth - 1) / paged::kMaxWidth * paged::kMaxWidth, E,
                  1, false, paged::row_type(query.scalar_type()), static_cast<float>(scale) * paged::kLog2e,
                  static_cast<float>(softcap) * paged::kLog2e, &lens,
                  paged::PagedRows(key_pages, value_pages, t, key_pool, value_pool), paged::DenseRows(), nullptr, 0, 0,
                  0};
  if (E > 0) {
    p.extra = paged::DenseRows(*extra_key, *extra_value);
    if (extra_valid.has_value()) {
      p.extra_valid = extra_valid->mutable_data_ptr<bool>();
      p.ev_b = extra_valid->stride(0), p.ev_h = extra_valid->stride(1), p.ev_e = extra_valid->stride(2);
    }
  }
  int64_t longest = 0, rows = 0;
  for (int64_t bh = 0; bh < B * H; ++bh) {
    longest = std::max(longest, stream_length(p, bh));
    rows += stream_length(p, bh);
  }
  p.serial = rows * 2 * D * key_pages.element_size() < paged::kSerialBytes;
  const int64_t want = (kItemsPerThread * static_cast<int64_t>(torch::stable::get_num_threads()) + B * H - 1) / (B * H);
  p.ns = p.serial ? 1 : std::max<int64_t>(1, std::min(want, longest / kMinSplitRows));
  ATTNGATE_DISPATCH_FLOATING_TYPES(query.scalar_type(), "decode_attention_cpu",
                                   [&] { decode<scalar_t>(p, query, out); });
}

void paged_decode_attention_out(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                const Tensor& page_table, const Tensor& lengths, double scale, double softcap,
                                const std::optional<Tensor>& extra_key, const std::optional<Tensor>& extra_value,
                                const std::optional<Tensor>& extra_valid, Tensor& out, const char* op) {
  decode_attention_out(::attngate::paged::make_read_tables(key_pages, page_table, lengths), key_pages, value_pages,
                       ::attngate::paged::make_pool(key_pages), ::attngate::paged::make_pool(value_pages), query, scale,
                       softcap, extra_key, extra_value, extra_valid, out, op);
}

Tensor paged_decode_attention_cpu(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                  const Tensor& page_table, const Tensor& lengths, double scale,
                                  const std::optional<Tensor>& extra_key, const std::optional<Tensor>& extra_value,
                                  const std::optional<Tensor>& extra_valid, double softcap) {
  check_paged_decode_attention_args(query, key_pages, value_pages, page_table, lengths, scale, extra_key, extra_value,
                                    extra_valid, softcap);
  Tensor out = empty_like_device(query.sizes(), query.scalar_type(), query);
  paged_decode_attention_out(query, key_pages, value_pages, page_table, lengths, scale, softcap, extra_key, extra_value,
                             extra_valid, out);
  return out;
}

ATTNGATE_IMPL(CPU, paged_decode_attention, paged_decode_attention_cpu);

}  // namespace attngate::cpu
