// paged_prefill_attention: tiled flash attention of a chunk over the paged cache, the extra rows and the chunk
// itself under the eviction rule. SIMT, float32 throughout.
//
// Block = (b, KV head, tile of the group's query heads, tile of queries): its R rows (heads x queries, R <= 64, fewer
// for large D so that the scaled queries and the running output fit in shared memory) walk one stream of key tiles
// of kKeys keys: paged tiles (every row visible), extra tiles, chunk tiles up to the block's last query. A key is
// visible to query t iff lo <= t <= hi (the same intervals as the CPU kernel: paged [-inf, inf], extra
// [-inf, extra_until], chunk key j [j, j | j + window - 1 | inf] for padding / evicted / kept). Per key tile:
//   keys     threads [0, kKeys) resolve pointers and intervals (bad page ids reported, their rows skipped); a tile
//            no row of the block sees is skipped whole
//   scores   K in column chunks of kChunk through shared memory; thread = (key, 1 of 8 row groups)
//   softmax  one warp per row: running max / sum in shared memory, weights of the tile
//   values   V in column chunks; thread = (column, 1 of 4 row groups), output rows in shared memory
#include <algorithm>
#include <limits>

#include "checks.h"
#include "cuda/paged_attention_device.cuh"
#include "cuda/stable_cuda.cuh"
#include "cuda_utils.cuh"
#include "dispatch.h"
#include "paged_attention_checks.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

constexpr int kThreads = 256;
constexpr int kKeys = 32;    // keys per tile = lanes of a warp
constexpr int kChunk = 64;   // columns of K / V per pass through shared memory
constexpr int kMaxRows = 64;
constexpr int kScoreGroups = kThreads / kKeys;   // 8 row groups in the score phase
constexpr int kValueGroups = kThreads / kChunk;  // 4 row groups in the value phase
constexpr int kMaxScoreRows = kMaxRows / kScoreGroups;
constexpr int kMaxValueRows = kMaxRows / kValueGroups;
constexpr int kAll = std::numeric_limits<int32_t>::max();

struct PrefillParams {
  int64_t q_b, q_h, q_t;                       // query strides
  int64_t kp_p, kp_s, vp_p, vp_s;              // key_pages / value_pages page and row strides
  int64_t pt_b, pt_h, pt_m;                    // page_table strides
  int64_t len_b, len_h;                        // lengths strides
  int64_t k_b, k_h, k_t, v_b, v_h, v_t;        // key / value strides
  int64_t keep_b, keep_h, keep_t, valid_b, valid_t;
  int64_t ek_b, ek_h, ek_e, ev_b, ev_h, ev_e;  // extra_key / extra_value strides
  int64_t eu_b, eu_h, eu_e;                    // extra_until strides
  int64_t H, Hq, group, gt, tq, gtiles, qtiles, P, S, capacity, E, T, window;
  int D, rows, pitch;  // head dim, rows per block (gt * tq), row pitch of q_s / o_s
  float scale;         // scale * log2(e)
  float cap;           // softcap * log2(e), 0: off (scores become cap * tanh(score / cap))
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 1) paged_prefill_kernel(
    const scalar_t* __restrict__ query,        // (B, Hq, T, D)
    const scalar_t* __restrict__ key_pages,    // (P, S, D)
    const scalar_t* __restrict__ value_pages,  // (P, S, D)
    const int32_t* __restrict__ page_table,    // (B, H, M)
    const int32_t* __restrict__ lengths,       // (B, H)
    const scalar_t* __restrict__ key,          // (B, H, T, D)
    const scalar_t* __restrict__ value,        // (B, H, T, D)
    const bool* __restrict__ keep,             // (B, H, T)
    const bool* __restrict__ valid,            // (B, T) or null
    const scalar_t* __restrict__ extra_key,    // (B, H, E, D) or null
    const scalar_t* __restrict__ extra_value,  // (B, H, E, D) or null
    const int32_t* __restrict__ extra_until,   // (B, H, E) or null
    scalar_t* __restrict__ out,                // (B, Hq, T, D) contiguous
    int32_t* __restrict__ status,              // (1)
    const PrefillParams p) {
  extern __shared__ __align__(16) float smem[];
  float* q_s = smem;                        // (rows, pitch) queries times scale * log2(e)
  float* o_s = q_s + p.rows * p.pitch;      // (rows, pitch) running output
  float* s_s = o_s + p.rows * p.pitch;      // (rows, kKeys + 1) scores, then weights
  float* kv_s = s_s + p.rows * (kKeys + 1);  // (kKeys, kChunk + 1) a column chunk of K or V
  __shared__ const scalar_t* krow_s[kKeys];
  __shared__ const scalar_t* vrow_s[kKeys];
  __shared__ int32_t lo_s[kKeys], hi_s[kKeys];
  __shared__ int32_t t_s[kMaxRows];
  __shared__ float m_s[kMaxRows], l_s[kMaxRows], alpha_s[kMaxRows];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, D = p.D, R = p.rows;

  int64_t blk = blockIdx.x;
  const int64_t qtile = blk % p.qtiles;
  blk /= p.qtiles;
  const int64_t gtile = blk % p.gtiles, bh = blk / p.gtiles, b = bh / p.H, h = bh % p.H;
  const int64_t t0 = qtile * p.tq, t1 = min(p.T, t0 + p.tq) - 1, g0 = gtile * p.gt;
  const int64_t gn = min(p.gt, p.group - g0);
  for (int i = tid; i < R * p.pitch; i += kThreads) {
    const int r = i / p.pitch, d = i - r * p.pitch;
    const int64_t g = r / p.tq, t = t0 + r % p.tq;
    const bool real = g < gn && t <= t1 && d < D;
    q_s[i] = real ? static_cast<float>(query[b * p.q_b + (h * p.group + g0 + g) * p.q_h + t * p.q_t + d]) * p.scale
                  : 0.f;
    o_s[i] = 0.f;
  }
  if (tid < R) {
    const int64_t t = t0 + tid % p.tq;
    t_s[tid] = static_cast<int32_t>(t <= t1 ? t : t1);  // padding rows: like the last query, never written
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  int64_t len = lengths[b * p.len_b + h * p.len_h];
  if (len < 0 || len > p.capacity) {
    if (tid == 0 && gtile == 0 && qtile == 0) atomicOr(status, kStatusLengthOutOfRange);
    len = len < 0 ? 0 : p.capacity;  // reported; the clamp only keeps the reads in bounds
  }
  const int64_t tiles_paged = (len + kKeys - 1) / kKeys, tiles_extra = (p.E + kKeys - 1) / kKeys;
  const int64_t tiles = tiles_paged + tiles_extra + (t1 + kKeys) / kKeys;  // chunk keys [0, t1]
  __syncthreads();

  for (int64_t tile = 0; tile < tiles; ++tile) {
    if (tid < kKeys) {
      const scalar_t *kr = nullptr, *vr = nullptr;
      int64_t lo = std::numeric_limits<int32_t>::min(), hi = kAll;
      if (tile < tiles_paged) {
        const int64_t row = tile * kKeys + tid;
        if (row < len) {
          const int64_t id = page_table[b * p.pt_b + h * p.pt_h + (row / p.S) * p.pt_m];
          if (id < 0 || id >= p.P) {
            if (gtile == 0 && qtile == 0) atomicOr(status, kStatusBadPageId);
          } else {
            kr = key_pages + id * p.kp_p + (row % p.S) * p.kp_s;
            vr = value_pages + id * p.vp_p + (row % p.S) * p.vp_s;
          }
        }
      } else if (tile < tiles_paged + tiles_extra) {
        const int64_t e = (tile - tiles_paged) * kKeys + tid;
        if (e < p.E) {
          hi = extra_until != nullptr ? extra_until[b * p.eu_b + h * p.eu_h + e * p.eu_e] : kAll;
          kr = extra_key + b * p.ek_b + h * p.ek_h + e * p.ek_e;
          vr = extra_value + b * p.ev_b + h * p.ev_h + e * p.ev_e;
        }
      } else {
        const int64_t j = (tile - tiles_paged - tiles_extra) * kKeys + tid;
        if (j <= t1) {
          lo = j;
          if (valid != nullptr && !valid[b * p.valid_b + j * p.valid_t]) {
            hi = j;
          } else if (!keep[b * p.keep_b + h * p.keep_h + j * p.keep_t]) {
            hi = min(j + p.window - 1, static_cast<int64_t>(kAll));
          }
          kr = key + b * p.k_b + h * p.k_h + j * p.k_t;
          vr = value + b * p.v_b + h * p.v_h + j * p.v_t;
        }
      }
      if (hi < t0 || lo > t1) kr = vr = nullptr;  // no row of the block sees it
      krow_s[tid] = kr;
      vrow_s[tid] = vr;
      lo_s[tid] = static_cast<int32_t>(lo);
      hi_s[tid] = static_cast<int32_t>(hi);
    }
    if (!__syncthreads_or(tid < kKeys && krow_s[tid] != nullptr)) continue;

    // Scores: thread (key kc = lane, row group = warp), rows warp + 8 * i.
    float acc[kMaxScoreRows];
#pragma unroll
    for (int i = 0; i < kMaxScoreRows; ++i) acc[i] = 0.f;
    for (int c0 = 0; c0 < D; c0 += kChunk) {
      for (int i = tid; i < kKeys * kChunk; i += kThreads) {  // consecutive threads: consecutive columns of a row
        const int k = i / kChunk, c = i - k * kChunk;
        const scalar_t* row = krow_s[k];
        kv_s[k * (kChunk + 1) + c] = row != nullptr && c0 + c < D ? static_cast<float>(row[c0 + c]) : 0.f;
      }
      __syncthreads();
      const int cn = min(kChunk, D - c0);
      for (int c = 0; c < cn; ++c) {
        const float kv = kv_s[lane * (kChunk + 1) + c];  // pitch kChunk + 1: conflict-free across lanes
#pragma unroll
        for (int i = 0; i < kMaxScoreRows; ++i) {
          const int r = warp + kScoreGroups * i;
          if (r < R) acc[i] += q_s[r * p.pitch + c0 + c] * kv;  // same address across the warp: broadcast
        }
      }
      __syncthreads();
    }
    const bool key_ok = krow_s[lane] != nullptr;
#pragma unroll
    for (int i = 0; i < kMaxScoreRows; ++i) {
      const int r = warp + kScoreGroups * i;
      if (r < R) {
        const int32_t t = t_s[r];
        const bool visible = key_ok && lo_s[lane] <= t && t <= hi_s[lane];
        s_s[r * (kKeys + 1) + lane] = visible ? (p.cap > 0.f ? p.cap * tanhf(acc[i] / p.cap) : acc[i]) : -INFINITY;
      }
    }
    __syncthreads();

    for (int r = warp; r < R; r += kThreads / 32) {  // online softmax of row r over the tile
      float w[1] = {s_s[r * (kKeys + 1) + lane]};
      paged_device::warp_softmax_step(w, &m_s[r], &l_s[r], &alpha_s[r], lane);
      s_s[r * (kKeys + 1) + lane] = w[0];
    }
    __syncthreads();

    // Values: thread (column c = tid % kChunk, row group tid / kChunk), rows group + 4 * i.
    const int vc = tid % kChunk, vg = tid / kChunk;
    for (int c0 = 0; c0 < D; c0 += kChunk) {
      for (int i = tid; i < kKeys * kChunk; i += kThreads) {
        const int k = i / kChunk, c = i - k * kChunk;
        const scalar_t* row = vrow_s[k];
        kv_s[k * (kChunk + 1) + c] = row != nullptr && c0 + c < D ? static_cast<float>(row[c0 + c]) : 0.f;
      }
      __syncthreads();
      if (c0 + vc < D) {
        float o[kMaxValueRows];
#pragma unroll
        for (int i = 0; i < kMaxValueRows; ++i) o[i] = 0.f;
        for (int k = 0; k < kKeys; ++k) {
          const float v = kv_s[k * (kChunk + 1) + vc];
#pragma unroll
          for (int i = 0; i < kMaxValueRows; ++i) {
            const int r = vg + kValueGroups * i;
            if (r < R) o[i] += s_s[r * (kKeys + 1) + k] * v;  // same row across the warp: broadcast
          }
        }
#pragma unroll
        for (int i = 0; i < kMaxValueRows; ++i) {  // each (row, column) has one owner: no race, fixed order
          const int r = vg + kValueGroups * i;
          if (r < R) o_s[r * p.pitch + c0 + vc] = o_s[r * p.pitch + c0 + vc] * alpha_s[r] + o[i];
        }
      }
      __syncthreads();
    }
  }

  for (int i = tid; i < R * D; i += kThreads) {
    const int r = i / D, d = i - r * D;
    const int64_t g = r / p.tq, t = t0 + r % p.tq;
    if (g >= gn || t > t1) continue;
    const float l = l_s[r];
    out[((b * p.Hq + h * p.group + g0 + g) * p.T + t) * D + d] =
        static_cast<scalar_t>(l > 0.f ? o_s[r * p.pitch + d] / l : 0.f);
  }
}

template <typename T>
const T* data_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? t->mutable_data_ptr<T>() : nullptr;
}

}  // namespace

Tensor paged_prefill_attention_cuda(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                    const Tensor& page_table, const Tensor& lengths, const Tensor& key,
                                    const Tensor& value, const Tensor& keep, const std::optional<Tensor>& valid,
                                    int64_t window, double scale, const std::optional<Tensor>& extra_key,
                                    const std::optional<Tensor>& extra_value,
                                    const std::optional<Tensor>& extra_until, double softcap) {
  check_paged_prefill_attention_args(query, key_pages, value_pages, page_table, lengths, key, value, keep, valid,
                                     window, scale, extra_key, extra_value, extra_until, softcap);
  const cuda::DeviceGuard device_guard(query);
  Tensor out = empty_like_device(query.sizes(), query.scalar_type(), query);
  if (out.numel() == 0) return out;
  const Tensor scratch = cuda::make_status_scratch(key_pages, 0, 1);
  const int64_t B = page_table.size(0), H = page_table.size(1), T = query.size(2), D = key_pages.size(2);
  const int64_t group = query.size(1) / H, E = extra_key.has_value() ? extra_key->size(2) : 0;
  const int64_t pitch = cuda::round_up(D, 4);
  // Rows per block: at most kMaxRows, and the queries and output rows (2 * rows * pitch floats) within 64 KiB.
  const int64_t rows = std::clamp<int64_t>(8192 / pitch, 1, kMaxRows);
  AG_CHECK(8192 / pitch >= 1, "paged_prefill_attention: the CUDA kernel supports head dim D <= 8192, got ", D);
  PrefillParams p;
  p.q_b = query.stride(0), p.q_h = query.stride(1), p.q_t = query.stride(2);
  p.kp_p = key_pages.stride(0), p.kp_s = key_pages.stride(1);
  p.vp_p = value_pages.stride(0), p.vp_s = value_pages.stride(1);
  p.pt_b = page_table.stride(0), p.pt_h = page_table.stride(1), p.pt_m = page_table.stride(2);
  p.len_b = lengths.stride(0), p.len_h = lengths.stride(1);
  p.k_b = key.stride(0), p.k_h = key.stride(1), p.k_t = key.stride(2);
  p.v_b = value.stride(0), p.v_h = value.stride(1), p.v_t = value.stride(2);
  p.keep_b = keep.stride(0), p.keep_h = keep.stride(1), p.keep_t = keep.stride(2);
  p.valid_b = valid.has_value() ? valid->stride(0) : 0, p.valid_t = valid.has_value() ? valid->stride(1) : 0;
  p.ek_b = p.ek_h = p.ek_e = p.ev_b = p.ev_h = p.ev_e = p.eu_b = p.eu_h = p.eu_e = 0;
  if (E > 0) {
    p.ek_b = extra_key->stride(0), p.ek_h = extra_key->stride(1), p.ek_e = extra_key->stride(2);
    p.ev_b = extra_value->stride(0), p.ev_h = extra_value->stride(1), p.ev_e = extra_value->stride(2);
    if (extra_until.has_value()) {
      p.eu_b = extra_until->stride(0), p.eu_h = extra_until->stride(1), p.eu_e = extra_until->stride(2);
    }
  }
  p.H = H, p.Hq = query.size(1), p.group = group, p.gt = std::min(group, rows);
  p.tq = std::clamp<int64_t>(rows / p.gt, 1, T);
  p.gtiles = cuda::ceil_div(group, p.gt), p.qtiles = cuda::ceil_div(T, p.tq);
  p.P = key_pages.size(0), p.S = key_pages.size(1), p.capacity = page_table.size(2) * p.S, p.E = E, p.T = T;
  p.window = std::min<int64_t>(window, T + 1);
  p.D = static_cast<int>(D), p.rows = static_cast<int>(p.gt * p.tq), p.pitch = static_cast<int>(pitch);
  p.scale = static_cast<float>(scale) * paged_device::kLog2e;
  p.cap = static_cast<float>(softcap) * paged_device::kLog2e;
  const int64_t smem = (2 * p.rows * pitch + p.rows * (kKeys + 1) + kKeys * (kChunk + 1)) * 4;
  const int64_t blocks = B * H * p.gtiles * p.qtiles;
  AG_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "paged_prefill_attention: too many blocks: ", blocks);
  const cudaStream_t stream = cuda::current_stream();
  ATTNGATE_DISPATCH_FLOATING_TYPES(query.scalar_type(), "paged_prefill_attention_cuda", [&] {
    auto kernel = paged_prefill_kernel<scalar_t>;
    if (smem > 32 * 1024) {  // past 48 KiB with the static part: opt in
      STD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        query.mutable_data_ptr<scalar_t>(), key_pages.mutable_data_ptr<scalar_t>(),
        value_pages.mutable_data_ptr<scalar_t>(), page_table.mutable_data_ptr<int32_t>(),
        lengths.mutable_data_ptr<int32_t>(), key.mutable_data_ptr<scalar_t>(), value.mutable_data_ptr<scalar_t>(),
        keep.mutable_data_ptr<bool>(), data_or_null<bool>(valid), E > 0 ? data_or_null<scalar_t>(extra_key) : nullptr,
        E > 0 ? data_or_null<scalar_t>(extra_value) : nullptr, E > 0 ? data_or_null<int32_t>(extra_until) : nullptr,
        out.mutable_data_ptr<scalar_t>(), scratch.mutable_data_ptr<int32_t>(), p);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  cuda::check_status("paged_prefill_attention", scratch);
  return out;
}

ATTNGATE_IMPL(CUDA, paged_prefill_attention, paged_prefill_attention_cuda);

}  // namespace attngate
