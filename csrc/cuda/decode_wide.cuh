// The general decode attention kernel, for head dims the tiled kernel does not take (rows too wide for its
// value-phase mapping or its shared-memory staging, e.g. D > 256 on unaligned rows or float32 D = 1024). Any D.
//
// Block = (persistent x, column chunk y of kThreads * kVec output columns). Work items (cuda/decode_plan.cuh) are
// chunks of one query head's row stream (head tiles of one query head), taken round-robin: block x takes items
// x, x + gridDim.x, ... Per tile of kWideRows rows, warp w scores rows w, w + 8, ... over the whole head dim
// (lanes strided over D, query read from global memory through L1), warp 0 runs the online softmax (log2 domain),
// and thread i accumulates columns [chunk * kThreads * kVec + i * kVec, + kVec) of the weighted values in registers.
// Query heads of a GQA group and column chunks re-read the keys: this path favours generality over bandwidth.
#pragma once
#include <cstdint>

#include "cuda/cuda_utils.cuh"
#include "cuda/decode_plan.cuh"
#include "cuda/decode_rows.cuh"

namespace attngate {
namespace decode {

constexpr int kWideThreads = 256;
constexpr int kWideRows = 32;  // rows per tile (4 per warp)

template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kWideThreads, 2) decode_wide_kernel(
    const scalar_t* __restrict__ query,        // (B, Hq, D)
    const scalar_t* __restrict__ key_pages,    // the pools (P, S, D) or the rectangle (B, H, C, D)
    const scalar_t* __restrict__ value_pages,
    const scalar_t* __restrict__ extra_key,    // (B, H, E, D) or null
    const scalar_t* __restrict__ extra_value,  // (B, H, E, D) or null
    const bool* __restrict__ extra_valid,      // (B, H, E) or null
    scalar_t* __restrict__ out,                // (B, Hq, D) contiguous
    float2* __restrict__ part_ml,              // (items) running (max, sum) of each item of a split head
    float* __restrict__ part_out,              // (items, D) unnormalised output of each such item
    const Plan plan, int32_t* __restrict__ status, const DecodeParams p) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  constexpr int kWarps = kWideThreads / 32;
  __shared__ const scalar_t* krow_s[kWideRows];
  __shared__ const scalar_t* vrow_s[kWideRows];
  __shared__ float w_s[kWideRows];
  __shared__ float m_s, l_s, alpha_s;
  const int64_t D = p.D, tiles = p.t.B * p.t.H * p.ntiles, items = *plan.items;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * kWideThreads + tid) * kVec;  // D % kVec == 0 if vector
  const bool active = col < D;

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t hh = item_head_tile(plan.prefix, tiles, item);
    const int64_t chunks = plan.prefix[hh + 1] - plan.prefix[hh], chunk = item - plan.prefix[hh];
    const int64_t bh = hh / p.ntiles, qg = hh - bh * p.ntiles;  // one query head per tile: qg in the group
    const int64_t b = bh / p.t.H, h = bh - b * p.t.H, qh = h * p.group + qg;
    const int64_t len = stream_rows(p.t, bh, 0);
    int64_t r_begin = 0, r_end = 0;
    item_rows(len + p.E, chunks, chunk, kWideRows, r_begin, r_end);
    const bool report = qg == 0 && blockIdx.y == 0;
    __syncthreads();  // the previous item is done with m_s, l_s and the row addresses
    if (tid == 0) {
      m_s = -INFINITY;
      l_s = 0.f;
    }
    __syncthreads();
    const scalar_t* q = query + b * p.q_b + qh * p.q_h;
    float acc[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] = 0.f;

    for (int64_t t0 = r_begin; t0 < r_end; t0 += kWideRows) {
      const int nr = static_cast<int>(r_end - t0 < kWideRows ? r_end - t0 : kWideRows);
      if (tid < kWideRows) {
        const int64_t j = tid < nr ? t0 + tid : INT64_MAX;
        stream_row(p, key_pages, value_pages, extra_key, extra_value, extra_valid, bh, len, j, report, status,
                   krow_s[tid], vrow_s[tid]);
      }
      __syncthreads();
#pragma unroll 1
      for (int r = warp; r < kWideRows; r += kWarps) {  // warp-uniform
        const scalar_t* krow = krow_s[r];
        float dot = 0.f;
        if (krow != nullptr) {
#pragma unroll 2
          for (int64_t d = lane * kVec; d < D; d += 32 * kVec) {
            float kf[kVec], qf[kVec];
            cuda::load_as_float<scalar_t, kVec>(krow + d, kf);
            cuda::load_as_float<scalar_t, kVec>(q + d, qf);
#pragma unroll
            for (int i = 0; i < kVec; ++i) dot += kf[i] * qf[i];
          }
        }
        dot = cuda::warp_sum(dot);
        if (lane == 0) w_s[r] = krow != nullptr ? soft_cap(dot * p.scale, p.cap) : -INFINITY;
      }
      __syncthreads();
      if (warp == 0) {  // online softmax over the tile, one row per lane
        const float s = w_s[lane];
        const float m_old = m_s;
        const float m_new = fmaxf(m_old, cuda::warp_max(s));
        const float e = s == -INFINITY ? 0.f : exp2f(s - m_new);
        const float sum = cuda::warp_sum(e);
        w_s[lane] = e;
        __syncwarp();  // every lane has read m_s before lane 0 rewrites it
        if (lane == 0) {
          const float alpha = m_old == -INFINITY ? 0.f : exp2f(m_old - m_new);
          alpha_s = alpha;
          l_s = l_s * alpha + sum;
          m_s = m_new;
        }
      }
      __syncthreads();
      if (active) {
        const float alpha = alpha_s;
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] *= alpha;
#pragma unroll 4
        for (int r = 0; r < nr; ++r) {
          const scalar_t* vrow = vrow_s[r];
          if (vrow == nullptr) continue;  // weight 0
          float vf[kVec];
          cuda::load_as_float<scalar_t, kVec>(vrow + col, vf);
          const float w = w_s[r];
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[i] += w * vf[i];
        }
      }
      __syncthreads();  // w_s, alpha_s and the row addresses are rewritten by the next tile
    }

    if (active) {
      if (chunks == 1) {
        const float inv_l = l_s > 0.f ? 1.f / l_s : 0.f;
#pragma unroll
        for (int i = 0; i < kVec; ++i) out[(b * p.Hq + qh) * D + col + i] = static_cast<scalar_t>(acc[i] * inv_l);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) part_out[item * D + col + i] = acc[i];
      }
    }
    if (chunks > 1 && blockIdx.y == 0 && tid == 0) part_ml[item] = make_float2(m_s, l_s);
  }
}

}  // namespace decode
}  // namespace attngate
