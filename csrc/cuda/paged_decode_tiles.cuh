// Device pieces of the CUDA paged decode kernel (csrc/cuda/paged_decode_attention.cu): block shape, parameters,
// the row stream of a head and the score phase of a tile.
#pragma once
#include <cstdint>

#include "checks.h"
#include "cuda_utils.cuh"

namespace attngate {
namespace paged_decode {

constexpr int kThreads = 128;
constexpr int kTileRows = 64;
constexpr int kLanesPerRow = 8;
constexpr int kRowGroups = kThreads / kLanesPerRow;   // 16
constexpr float kLn2 = 0.6931471805599453f;  // partial maxima go to the merge in natural-log units

struct DecodeParams {
  int64_t q_b, q_h;                          // query strides
  int64_t kp_p, kp_s, vp_p, vp_s;            // key_pages / value_pages page and row strides
  int64_t pt_b, pt_h, pt_m;                  // page_table strides
  int64_t len_b, len_h;                      // lengths strides
  int64_t ek_b, ek_h, ek_e, ev_b, ev_h, ev_e;  // extra_key / extra_value strides
  int64_t evd_b, evd_h, evd_e;               // extra_valid strides
  int64_t H, Hq, group, gtiles, P, S, capacity, E;
  int D, nvec, nsplit;
  float scale;  // scale * log2(e)
};

// Row r of head (b, h)'s stream: paged rows [0, len), then extra row r - tiles_paged * kTileRows; null when the row
// does not exist, is an invalid extra row or sits on a bad page (reported when `report`).
template <typename scalar_t>
__device__ __forceinline__ void stream_row(const DecodeParams& p, const scalar_t* key_pages,
                                           const scalar_t* value_pages, const int32_t* page_table,
                                           const scalar_t* extra_key, const scalar_t* extra_value,
                                           const bool* extra_valid, int64_t b, int64_t h, int64_t len,
                                           int64_t tiles_paged, int64_t tile, int r, bool report, int32_t* status,
                                           const scalar_t*& krow, const scalar_t*& vrow) {
  krow = nullptr;
  vrow = nullptr;
  if (tile < tiles_paged) {
    const int64_t row = tile * kTileRows + r;
    if (row >= len) return;
    const int64_t id = page_table[b * p.pt_b + h * p.pt_h + (row / p.S) * p.pt_m];
    if (id < 0 || id >= p.P) {
      if (report) atomicOr(status, kStatusBadPageId);
      return;
    }
    const int64_t slot = row % p.S;
    krow = key_pages + id * p.kp_p + slot * p.kp_s;
    vrow = value_pages + id * p.vp_p + slot * p.vp_s;
  } else {
    const int64_t e = (tile - tiles_paged) * kTileRows + r;
    if (e >= p.E || (extra_valid != nullptr && !extra_valid[b * p.evd_b + h * p.evd_h + e * p.evd_e])) return;
    krow = extra_key + b * p.ek_b + h * p.ek_h + e * p.ek_e;
    vrow = extra_value + b * p.ev_b + h * p.ev_h + e * p.ev_e;
  }
}

// Scores of the tile's rows against the block's kGT scaled queries into w_s (-inf for missing rows). Row-group
// rg = tid / 8 covers rows rg + 16 * (pass * kRowsPerLane + rr); lane sub = tid % 8 covers vectors sub, sub + 8, ...
// of each row and the 8 lanes are summed with shuffles. All K loads of a pass are issued before any use.
template <typename scalar_t, bool kVector, int kGT>
__device__ __forceinline__ void tile_scores(const scalar_t* const* krow_s,  // (kTileRows) row pointers or null
                                            const float* q_s, int D, int nvec, int tid,
                                            float (*w_s)[kTileRows]) {      // (kGT, kTileRows)
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  constexpr int kRowsPerLane = kGT >= 8 ? 2 : 4;  // 2 with 8 heads, so that everything fits in 128 registers
  constexpr int kPasses = kTileRows / (kRowGroups * kRowsPerLane);
  const int rg = tid / kLanesPerRow, sub = tid % kLanesPerRow;
#pragma unroll 1
  for (int pass = 0; pass < kPasses; ++pass) {
    const int r0 = rg + kRowGroups * pass * kRowsPerLane;  // rows r0 + kRowGroups * rr
    float dot[kRowsPerLane][kGT];
#pragma unroll
    for (int rr = 0; rr < kRowsPerLane; ++rr)
#pragma unroll
      for (int g = 0; g < kGT; ++g) dot[rr][g] = 0.f;
    for (int v = sub; v < nvec; v += kLanesPerRow) {
      if constexpr (kVector) {
        uint4 raw[kRowsPerLane];  // converted 4 elements at a time to keep register pressure down
#pragma unroll
        for (int rr = 0; rr < kRowsPerLane; ++rr) {
          const scalar_t* row = krow_s[r0 + kRowGroups * rr];
          raw[rr] = cuda::load_raw16(row + v * kVec, row != nullptr);
        }
#pragma unroll
        for (int i = 0; i < kVec; i += 4) {
          float kf[kRowsPerLane][4];
#pragma unroll
          for (int rr = 0; rr < kRowsPerLane; ++rr) cuda::unpack4_as_float<scalar_t>(raw[rr], i, kf[rr]);
#pragma unroll
          for (int g = 0; g < kGT; ++g) {
            // 16-byte aligned: D is a multiple of kVec on the vector path.
            const float4 q = *reinterpret_cast<const float4*>(q_s + g * D + v * kVec + i);
#pragma unroll
            for (int rr = 0; rr < kRowsPerLane; ++rr) {
              dot[rr][g] += kf[rr][0] * q.x + kf[rr][1] * q.y + kf[rr][2] * q.z + kf[rr][3] * q.w;
            }
          }
        }
      } else {
        float kf[kRowsPerLane];
#pragma unroll
        for (int rr = 0; rr < kRowsPerLane; ++rr) {
          const scalar_t* row = krow_s[r0 + kRowGroups * rr];
          kf[rr] = row != nullptr ? static_cast<float>(row[v]) : 0.f;
        }
#pragma unroll
        for (int g = 0; g < kGT; ++g) {
          const float q = q_s[g * D + v];
#pragma unroll
          for (int rr = 0; rr < kRowsPerLane; ++rr) dot[rr][g] += kf[rr] * q;
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < kRowsPerLane; ++rr) {
      const int r = r0 + kRowGroups * rr;
#pragma unroll
      for (int g = 0; g < kGT; ++g) {
#pragma unroll
        for (int off = kLanesPerRow / 2; off > 0; off >>= 1) {
          dot[rr][g] += __shfl_xor_sync(cuda::kFullMask, dot[rr][g], off);
        }
        if (g % kLanesPerRow == sub) w_s[g][r] = krow_s[r] != nullptr ? dot[rr][g] : -INFINITY;
      }
    }
  }
}

}  // namespace paged_decode
}  // namespace attngate
