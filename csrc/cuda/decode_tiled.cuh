// The tiled decode attention kernel (flash-decoding), the fast path of paged_decode_attention, decode_attention and
// the decode step. A persistent block takes work items (cuda/decode_plan.cuh): an item is a chunk of one head
// tile's row stream, the head tile being (batch, KV head, tile of up to kGT query heads of its GQA group). All query
// heads of the tile share every K/V row the block reads, which it walks in tiles of kTileRows rows:
//   rows    threads [0, kTileRows) look up the addresses of the tile's rows (a page-table read per row, or the
//           extra rows); a bad page id is reported and its row skipped
//   scores  4 lanes per row, kRowsPerThread rows per thread, all kGT heads at once (transposed shuffle sum)
//   softmax warp g updates head g's running max / sum (log2 domain) and turns the tile's scores into weights
//   values  thread = (16-byte column of V, group of heads, row slice), acc[kGV][kVec] in registers
// Vector path (16-byte aligned rows): K and V tiles are staged in shared memory with cp.async from the looked-up
// row addresses, one buffer each, so the next tile is always in flight: K(i + 1) is requested as soon as the
// scores of tile i have read K(i), and streams in during the softmax and value phases; V(i + 1) is requested once
// the values of tile i are done, and streams in during the scores of tile i + 1. Each K and V vector is read from
// memory once for every query head of the tile. The scalar path (unaligned rows) reads global memory directly.
// Row slices are summed through shared memory once per item (deterministic order).
#pragma once
#include <cstdint>

#include "cuda/async_copy.cuh"
#include "cuda/cuda_utils.cuh"
#include "cuda/decode_plan.cuh"
#include "cuda/decode_rows.cuh"

namespace attngate {
namespace decode {

constexpr int kThreads = 256;
constexpr int kLanesPerRow = 4;  // score phase: lanes sharing one row's dot products

// Query heads per value-phase thread, for tiles of gt heads and vec elements per load (1 on the scalar path):
// 8-head vector tiles are split so that a thread accumulates 16 floats.
__host__ __device__ constexpr int value_heads(int gt, int vec) { return vec > 1 && gt > 4 ? 16 / vec : gt; }

// Requests the rows of `rows` (kTileRows pointers, null: a zero row) [0, nr) into dst (row pitch `pitch` elements),
// nvec 16-byte vectors per row. Does not commit the group.
template <typename scalar_t>
__device__ __forceinline__ void stage_rows(scalar_t* dst, int pitch, const scalar_t* const* rows, int nr, int nvec) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
  for (int i = threadIdx.x; i < nr * nvec; i += kThreads) {
    const int r = i / nvec, v = i - r * nvec;
    scalar_t* to = dst + r * pitch + v * kVec;
    if (rows[r] != nullptr) {
      cuda::cp_async16(to, rows[r] + v * kVec);
    } else {
      *reinterpret_cast<uint4*>(to) = make_uint4(0u, 0u, 0u, 0u);  // zeros: weight 0 times a finite value
    }
  }
}

template <typename scalar_t, bool kVector, int kGT, int kRowsPerThread>
__global__ void __launch_bounds__(kThreads, 2) decode_tiled_kernel(
    const scalar_t* __restrict__ query,        // (B, Hq, D)
    const scalar_t* __restrict__ key_pages,    // the pools (P, S, D) or the rectangle (B, H, C, D)
    const scalar_t* __restrict__ value_pages,
    const scalar_t* __restrict__ extra_key,    // (B, H, E, D) or null
    const scalar_t* __restrict__ extra_value,  // (B, H, E, D) or null
    const bool* __restrict__ extra_valid,      // (B, H, E) or null
    scalar_t* __restrict__ out,                // (B, Hq, D) contiguous
    float2* __restrict__ part_ml,              // (items, kGT) running (max, sum) of each item of a split head
    float* __restrict__ part_out,              // (items, kGT, D) unnormalised output of each such item
    const Plan plan, int32_t* __restrict__ status, const DecodeParams p) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  constexpr int kRowGroups = kThreads / kLanesPerRow;  // rows scored at once
  constexpr int kTileRows = kRowGroups * kRowsPerThread;
  constexpr int kN = kRowsPerThread * kGT;  // dot products per thread, index rr * kGT + g
  constexpr int kHeld = kN >= kLanesPerRow ? kN / kLanesPerRow : 1;
  constexpr int kLanesPerValue = kN >= kLanesPerRow ? 1 : kLanesPerRow / kN;
  constexpr int kGV = value_heads(kGT, kVec);  // query heads per value-phase thread
  constexpr int kGroupsV = kGT / kGV;
  // Little unrolling: staged rows come from shared memory (short latency), and 8-head tiles fill the register
  // budget.
  constexpr int kScoreUnroll = kN >= 8 ? 1 : 2;
  constexpr int kValueUnroll = kGV * kVec >= 32 ? 2 : 4;
  extern __shared__ __align__(16) unsigned char smem[];
  float* q_s = reinterpret_cast<float*>(smem);                  // (kGT, D) scaled queries
  float* w_s = reinterpret_cast<float*>(smem + p.w_off);        // (kGT, kTileRows) scores, then weights
  scalar_t* k_s = reinterpret_cast<scalar_t*>(smem + p.k_off);  // (kTileRows, pitch) staged keys
  scalar_t* v_s = reinterpret_cast<scalar_t*>(smem + p.v_off);  // (kTileRows, pitch) staged values
  float* red_s = reinterpret_cast<float*>(smem + p.red_off);    // (kGT, D) after the row loop
  __shared__ const scalar_t* krow_s[2][kTileRows];  // row addresses of the current and the next tile
  __shared__ const scalar_t* vrow_s[2][kTileRows];
  __shared__ float m_s[kGT], l_s[kGT], alpha_s[kGT];
  __shared__ int64_t item_s;

  const int D = p.D, nvec = p.nvec, pitch = p.pitch;  // small on this path
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t tiles = p.t.B * p.t.H * p.ntiles;
  const int sub = tid / kLanesPerRow, sl = tid % kLanesPerRow;  // score phase: row group and lane in row
  // Value phase: thread = (column vector, group of kGV heads, row slice). Splitting the 8 heads of a vector tile
  // over several threads bounds acc at 16 floats; they re-read the V vector from shared memory, not HBM.
  const int vcol = tid % nvec, vg0 = (tid / nvec) % kGroupsV * kGV, slice = tid / nvec / kGroupsV;
  const int row_slices = kThreads / (nvec * kGroupsV);  // >= 1: the host checks nvec * kGroupsV <= kThreads
  const bool v_active = slice < row_slices;

  for (;;) {
    if (tid == 0) item_s = atomicAdd(plan.counter, 1);
    __syncthreads();  // also: the previous item is done with every shared buffer
    const int64_t item = item_s;
    if (item >= *plan.items) return;  // uniform
    const int64_t hh = item_head_tile(plan.prefix, tiles, item);
    const int64_t chunks = plan.prefix[hh + 1] - plan.prefix[hh], chunk = item - plan.prefix[hh];
    const int64_t bh = hh / p.ntiles, tile = hh - bh * p.ntiles;
    const int64_t b = bh / p.t.H, h = bh - b * p.t.H;
    const int64_t qh0 = h * p.group + tile * kGT;
    const int gt = static_cast<int>(p.group - tile * kGT < kGT ? p.group - tile * kGT : kGT);
    const int64_t len = stream_rows(p.t, bh, 0);
    int64_t r_begin = 0, r_end = 0;
    item_rows(len + p.E, chunks, chunk, kTileRows, r_begin, r_end);

    for (int i = tid; i < kGT * D; i += kThreads) {
      const int g = i / D, d = i - g * D;
      q_s[i] = g < gt ? static_cast<float>(query[b * p.q_b + (qh0 + g) * p.q_h + d]) * p.scale : 0.f;
    }
    if (tid < kGT) {
      m_s[tid] = -INFINITY;
      l_s[tid] = 0.f;
    }
    // Addresses of the first two tiles; bad page ids are reported by the first query tile only.
    for (int i = tid; i < 2 * kTileRows; i += kThreads) {
      const int buf = i / kTileRows, r = i - buf * kTileRows;
      const int64_t j = r_begin + buf * kTileRows + r;
      stream_row(p, key_pages, value_pages, extra_key, extra_value, extra_valid, bh, len, j < r_end ? j : INT64_MAX,
                 tile == 0, status, krow_s[buf][r], vrow_s[buf][r]);
    }
    __syncthreads();

    float acc[kGV][kVec];
#pragma unroll
    for (int j = 0; j < kGV; ++j)
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[j][i] = 0.f;

    if constexpr (kVector) {  // prologue: the first tile's keys, then its values (two groups)
      const int nr0 = static_cast<int>(r_end - r_begin < kTileRows ? r_end - r_begin : kTileRows);
      if (nr0 > 0) stage_rows(k_s, pitch, krow_s[0], nr0, nvec);
      cuda::cp_async_commit();
      if (nr0 > 0) stage_rows(v_s, pitch, vrow_s[0], nr0, nvec);
      cuda::cp_async_commit();
    }

    int cur = 0;
    for (int64_t t0 = r_begin; t0 < r_end; t0 += kTileRows, cur ^= 1) {
      const int nr = static_cast<int>(r_end - t0 < kTileRows ? r_end - t0 : kTileRows);
      const int64_t t1 = t0 + kTileRows;  // the next tile
      const int nr1 = static_cast<int>(r_end - t1 <= 0 ? 0 : (r_end - t1 < kTileRows ? r_end - t1 : kTileRows));
      if constexpr (kVector) {
        cuda::cp_async_wait<1>();  // this thread's K(t0) copies have landed (V(t0) may be in flight)
        __syncthreads();           // ... and everyone else's
      }
      const scalar_t* const* krows = krow_s[cur];
      // Scores: thread (sub, sl) covers rows sub + kRowGroups * rr of the tile, vectors sl, sl + 4, ... of each row.
      float dot[kN];
#pragma unroll
      for (int i = 0; i < kN; ++i) dot[i] = 0.f;
#pragma unroll(kScoreUnroll)
      for (int v = sl; v < nvec; v += kLanesPerRow) {
        if constexpr (kVec > 1) {
          uint4 raw[kRowsPerThread];  // converted four elements at a time to keep register pressure down
#pragma unroll
          for (int rr = 0; rr < kRowsPerThread; ++rr) {
            const int r = sub + rr * kRowGroups;
            raw[rr] = cuda::load_raw16(k_s + r * pitch + v * kVec, r < nr);
          }
#pragma unroll
          for (int i4 = 0; i4 < kVec; i4 += 4) {
            float kf[kRowsPerThread][4];
#pragma unroll
            for (int rr = 0; rr < kRowsPerThread; ++rr) cuda::unpack4_as_float<scalar_t>(raw[rr], i4, kf[rr]);
#pragma unroll
            for (int g = 0; g < kGT; ++g) {
              // 16-byte aligned: D * 4 bytes is a multiple of 16 on the vector path.
              const float4 q4 = *reinterpret_cast<const float4*>(q_s + g * D + v * kVec + i4);
#pragma unroll
              for (int rr = 0; rr < kRowsPerThread; ++rr) {
                dot[rr * kGT + g] += kf[rr][0] * q4.x + kf[rr][1] * q4.y + kf[rr][2] * q4.z + kf[rr][3] * q4.w;
              }
            }
          }
        } else {
          float kf[kRowsPerThread];
#pragma unroll
          for (int rr = 0; rr < kRowsPerThread; ++rr) {
            const int r = sub + rr * kRowGroups;
            const scalar_t* row = r < nr ? krows[r] : nullptr;
            kf[rr] = row != nullptr ? static_cast<float>(row[v]) : 0.f;
          }
#pragma unroll
          for (int g = 0; g < kGT; ++g) {
            const float qv = q_s[g * D + v];
#pragma unroll
            for (int rr = 0; rr < kRowsPerThread; ++rr) dot[rr * kGT + g] += kf[rr] * qv;
          }
        }
      }
      cuda::warp_transpose_sum<kN, kLanesPerRow / 2>(dot, lane);
      // Lane sl now holds the sums of indices sl * kHeld + [0, kHeld) (kN >= 4), or index sl / kLanesPerValue
      // (kN < 4, every kLanesPerValue-th lane writes it).
      if (sl % kLanesPerValue == 0) {
#pragma unroll
        for (int i = 0; i < kHeld; ++i) {
          const int idx = kN >= kLanesPerRow ? sl * kHeld + i : sl / kLanesPerValue;
          const int rr = idx / kGT, g = idx % kGT;
          const int r = sub + rr * kRowGroups;
          w_s[g * kTileRows + r] = r < nr && krows[r] != nullptr ? soft_cap(dot[i], p.cap) : -INFINITY;
        }
      }
      __syncthreads();  // scores complete; k_s is free
      if constexpr (kVector) {
        if (nr1 > 0) stage_rows(k_s, pitch, krow_s[cur ^ 1], nr1, nvec);
        cuda::cp_async_commit();
      }

      if (warp < kGT) {  // online softmax of head g = warp over the tile (log2 domain)
        float s[kTileRows / 32];
        float tmax = -INFINITY;
#pragma unroll
        for (int j = 0; j < kTileRows / 32; ++j) {
          s[j] = w_s[warp * kTileRows + lane + 32 * j];
          tmax = fmaxf(tmax, s[j]);
        }
        tmax = cuda::warp_max(tmax);
        const float m_old = m_s[warp];
        const float m_new = fmaxf(m_old, tmax);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kTileRows / 32; ++j) {
          const float e = s[j] == -INFINITY ? 0.f : exp2f(s[j] - m_new);  // also keeps -inf - -inf out
          w_s[warp * kTileRows + lane + 32 * j] = e;
          sum += e;
        }
        sum = cuda::warp_sum(sum);
        __syncwarp();  // every lane has read m_s before lane 0 rewrites it
        if (lane == 0) {
          const float alpha = m_old == -INFINITY ? 0.f : exp2f(m_old - m_new);
          alpha_s[warp] = alpha;
          l_s[warp] = l_s[warp] * alpha + sum;
          m_s[warp] = m_new;
        }
      }
      if constexpr (kVector) cuda::cp_async_wait<1>();  // V(t0) has landed (K(t1) may be in flight)
      __syncthreads();

      if (v_active) {
#pragma unroll
        for (int j = 0; j < kGV; ++j) {
          const float alpha = alpha_s[vg0 + j];
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[j][i] *= alpha;
        }
        const scalar_t* const* vrows = vrow_s[cur];
#pragma unroll(kValueUnroll)
        for (int r = slice; r < nr; r += row_slices) {
          float vf[kVec];
          if constexpr (kVector) {
            cuda::load_as_float<scalar_t, kVec>(v_s + r * pitch + vcol * kVec, vf);
          } else {
            const scalar_t* row = vrows[r];
            if (row == nullptr) continue;  // weight 0
            cuda::load_as_float<scalar_t, kVec>(row + vcol * kVec, vf);
          }
#pragma unroll
          for (int j = 0; j < kGV; ++j) {
            const float w = w_s[(vg0 + j) * kTileRows + r];
#pragma unroll
            for (int i = 0; i < kVec; ++i) acc[j][i] += w * vf[i];
          }
        }
      }
      __syncthreads();  // v_s, w_s and alpha_s are rewritten next; row addresses of this tile are free
      if constexpr (kVector) {
        if (nr1 > 0) stage_rows(v_s, pitch, vrow_s[cur ^ 1], nr1, nvec);
        cuda::cp_async_commit();
      }
      // Addresses of the tile after next, into this tile's buffer (read again after the next __syncthreads).
      const int64_t t2 = t0 + 2 * kTileRows;
      if (t2 < r_end) {
        for (int r = tid; r < kTileRows; r += kThreads) {
          const int64_t j = t2 + r;
          stream_row(p, key_pages, value_pages, extra_key, extra_value, extra_valid, bh, len,
                     j < r_end ? j : INT64_MAX, tile == 0, status, krow_s[cur][r], vrow_s[cur][r]);
        }
      }
    }
    if constexpr (kVector) cuda::cp_async_wait<0>();  // only empty groups remain; red_s may alias k_s
    __syncthreads();

    // Sum the row slices in a fixed order, so the result does not depend on scheduling.
    for (int s = 0; s < row_slices; ++s) {
      if (slice == s) {
#pragma unroll
        for (int j = 0; j < kGV; ++j)
#pragma unroll
          for (int i = 0; i < kVec; ++i) {
            float* dst = red_s + (vg0 + j) * D + vcol * kVec + i;
            *dst = s == 0 ? acc[j][i] : *dst + acc[j][i];
          }
      }
      __syncthreads();
    }

    const int64_t out_row0 = b * p.Hq + qh0;
    for (int i = tid; i < gt * D; i += kThreads) {
      const int g = i / D, d = i - g * D;
      if (chunks == 1) {
        const float l = l_s[g];
        out[(out_row0 + g) * D + d] = static_cast<scalar_t>(l > 0.f ? red_s[i] / l : 0.f);
      } else {
        part_out[(item * kGT + g) * D + d] = red_s[i];
      }
    }
    if (chunks > 1 && tid < gt) part_ml[item * kGT + tid] = make_float2(m_s[tid], l_s[tid]);
  }
}

}  // namespace decode
}  // namespace attngate
