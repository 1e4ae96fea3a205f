// The general decode_attention kernel, for head dims the tiled kernel does not take (rows too wide for its
// value-phase mapping or its shared-memory staging, e.g. D > 256 on unaligned rows or float32 D = 1024). Any D.
//
// Block = (batch, query head, column chunk of kThreads * kVec output columns, split of the live rows). Per tile
// of kWideRows rows, warp w scores rows w, w + 8, ... over the whole head dim (lanes strided over D, query read
// from global memory through L1), warp 0 runs the online softmax, and thread i accumulates columns
// [chunk * kThreads * kVec + i * kVec, + kVec) of the weighted values in registers. Query heads of a GQA group
// and column chunks re-read the keys: this path favours generality over bandwidth.
#pragma once
#include <cstdint>

#include "cuda_utils.cuh"
#include "decode_common.cuh"

namespace attngate {
namespace decode {

template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads, 2) decode_wide_kernel(
    const scalar_t* __restrict__ query,        // (B, Hq, D)
    const scalar_t* __restrict__ key_cache,    // (B, H, C, D)
    const scalar_t* __restrict__ value_cache,  // (B, H, C, D)
    const int32_t* __restrict__ lengths,       // (B, H)
    scalar_t* __restrict__ out,                // (B, Hq, D) contiguous; written here when nsplit == 1
    float2* __restrict__ part_ml,              // (B * Hq, nsplit)
    float* __restrict__ part_out,              // (B * Hq, nsplit, D)
    int32_t* __restrict__ status,              // (1) zeroed
    const DecodeParams p) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  constexpr int kWarps = kThreads / 32;
  __shared__ float w_s[kWideRows];
  __shared__ float m_s, l_s, alpha_s;
  const int64_t blk = blockIdx.x;
  const int split = static_cast<int>(blk % p.nsplit);
  const int64_t rest = blk / p.nsplit;
  const int64_t chunk = rest % p.ncol;
  const int64_t row = rest / p.ncol;  // b * Hq + query head
  const int64_t b = row / p.Hq, qh = row % p.Hq, h = qh / p.group;
  const int64_t D = p.D;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid == 0) {
    m_s = -INFINITY;
    l_s = 0.f;
  }
  const int64_t len = live_rows(lengths, p, b, h, qh % p.group == 0 && split == 0 && chunk == 0, status);
  int64_t r_begin = 0, r_end = 0;
  split_range(len, p.nsplit, split, kWideRows, r_begin, r_end);
  __syncthreads();

  const scalar_t* q = query + b * p.q_sb + qh * p.q_sh;
  const scalar_t* kbase = key_cache + b * p.kc_sb + h * p.kc_sh;
  const scalar_t* vbase = value_cache + b * p.vc_sb + h * p.vc_sh;
  const int64_t col = (chunk * kThreads + tid) * kVec;  // D is a multiple of kVec on the vector path
  const bool active = col < D;
  float acc[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc[i] = 0.f;

  for (int64_t t0 = r_begin; t0 < r_end; t0 += kWideRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kWideRows, r_end - t0));
#pragma unroll 1
    for (int r = warp; r < kWideRows; r += kWarps) {  // warp-uniform
      float dot = 0.f;
      if (r < nr) {
        const scalar_t* krow = kbase + (t0 + r) * p.kc_sc;
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
      if (lane == 0) w_s[r] = r < nr ? dot * p.scale : -INFINITY;
    }
    __syncthreads();
    if (warp == 0) {  // online softmax over the tile, one row per lane
      const float s = w_s[lane];
      const float m_old = m_s;
      const float m_new = fmaxf(m_old, cuda::warp_max(s));
      const float e = s == -INFINITY ? 0.f : expf(s - m_new);
      const float sum = cuda::warp_sum(e);
      w_s[lane] = e;
      if (lane == 0) {
        const float alpha = m_old == -INFINITY ? 0.f : expf(m_old - m_new);
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
        float vf[kVec];
        cuda::load_as_float<scalar_t, kVec>(vbase + (t0 + r) * p.vc_sc + col, vf);
        const float w = w_s[r];
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] += w * vf[i];
      }
    }
    __syncthreads();  // w_s and alpha_s are rewritten by the next tile
  }

  if (active) {
    if (p.nsplit == 1) {
      const float inv_l = l_s > 0.f ? 1.f / l_s : 0.f;
      float o[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) o[i] = acc[i] * inv_l;
#pragma unroll
      for (int i = 0; i < kVec; ++i) out[row * D + col + i] = static_cast<scalar_t>(o[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) part_out[(row * p.nsplit + split) * D + col + i] = acc[i];
    }
  }
  if (p.nsplit > 1 && chunk == 0 && tid == 0) part_ml[row * p.nsplit + split] = make_float2(m_s, l_s);
}

}  // namespace decode
}  // namespace attngate
