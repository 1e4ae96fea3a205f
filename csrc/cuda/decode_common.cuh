// Shared by the decode_attention kernels: launch constants, parameters, the device-side split of a head's live
// rows, and the merge of per-split partial results.
#pragma once
#include <cstdint>

#include "cuda_utils.cuh"

namespace attngate {
namespace decode {

constexpr int kThreads = 256;
constexpr int kLanesPerRow = 4;     // score phase of the tiled kernel: lanes sharing one row's dot products
constexpr int kMaxSplits = 128;
constexpr int kMinSplitRows = 256;  // a split is worth its merge cost only above this many rows
constexpr int kMergeThreads = 128;
constexpr int kWideRows = 32;       // rows per tile of the wide kernel (4 per warp)

struct DecodeParams {
  int64_t q_sb, q_sh;           // query strides
  int64_t kc_sb, kc_sh, kc_sc;  // key_cache strides
  int64_t vc_sb, vc_sh, vc_sc;  // value_cache strides
  int64_t len_sb, len_sh;       // lengths strides
  int64_t H, Hq, group, ntiles, C, D;
  int nvec, nsplit;
  int pitch;                    // staged row pitch in elements (tiled kernel, vector path)
  int ncol;                     // column chunks per query head (wide kernel)
  int w_off, k_off, v_off, red_off;  // byte offsets into dynamic shared memory (tiled kernel)
  float scale;
};

// Query heads per value-phase thread of the tiled kernel, for tiles of gt heads and vec elements per load (1 on
// the scalar path): 8-head vector tiles are split so that a thread accumulates 16 floats.
__host__ __device__ constexpr int value_heads(int gt, int vec) { return vec > 1 && gt > 4 ? 16 / vec : gt; }

// Rows [begin, end) of split `split` out of nsplit for a head with `len` live rows. The splits are sized on the
// device from the real length (no host synchronisation): min(nsplit, ceil(len / kMinSplitRows)) useful splits
// of equal size, rounded up to `align` rows; the remaining splits get no rows.
__device__ __forceinline__ void split_range(int64_t len, int nsplit, int split, int align, int64_t& begin,
                                            int64_t& end) {
  int64_t useful = cuda::ceil_div(len, kMinSplitRows);
  useful = useful < 1 ? 1 : (useful > nsplit ? nsplit : useful);
  const int64_t rows = cuda::round_up(cuda::ceil_div(len, useful), align);
  begin = static_cast<int64_t>(split) * rows;
  end = begin + rows < len ? begin + rows : len;
}

// Reads lengths[b, h]; an out-of-range length is reported through `status` (by the caller's designated block)
// and clamped, which only keeps the reads in bounds.
__device__ __forceinline__ int64_t live_rows(const int32_t* __restrict__ lengths, const DecodeParams& p, int64_t b,
                                             int64_t h, bool report, int32_t* __restrict__ status) {
  const int64_t len = lengths[b * p.len_sb + h * p.len_sh];
  if (len >= 0 && len <= p.C) return len;
  if (report && threadIdx.x == 0) atomicOr(status, kStatusLengthOutOfRange);
  return len < 0 ? 0 : p.C;
}

// Combines the splits of one (batch, query head): out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s.
template <typename scalar_t>
__global__ void __launch_bounds__(kMergeThreads) decode_merge_kernel(
    const float2* __restrict__ part_ml,  // (B * Hq, nsplit)
    const float* __restrict__ part_out,  // (B * Hq, nsplit, D)
    scalar_t* __restrict__ out,          // (B * Hq, D)
    int nsplit, int64_t D) {
  __shared__ float weight_s[kMaxSplits];
  __shared__ float inv_l_s;
  const int64_t row = blockIdx.x;
  const float2* ml = part_ml + row * nsplit;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float m = -INFINITY;
    for (int s = lane; s < nsplit; s += 32) m = fmaxf(m, ml[s].x);
    m = cuda::warp_max(m);
    float l = 0.f;
    for (int s = lane; s < nsplit; s += 32) {
      const float2 v = ml[s];
      const float w = v.x == -INFINITY ? 0.f : expf(v.x - m);  // empty splits weigh nothing
      weight_s[s] = w;
      l += w * v.y;
    }
    l = cuda::warp_sum(l);
    if (lane == 0) inv_l_s = l > 0.f ? 1.f / l : 0.f;  // a head with no live rows gives zeros
  }
  __syncthreads();
  const float* src = part_out + row * nsplit * D;
  for (int64_t d = threadIdx.x; d < D; d += kMergeThreads) {
    float acc = 0.f;
    for (int s = 0; s < nsplit; ++s) acc += weight_s[s] * src[s * D + d];
    out[row * D + d] = static_cast<scalar_t>(acc * inv_l_s);
  }
}

}  // namespace decode
}  // namespace attngate
