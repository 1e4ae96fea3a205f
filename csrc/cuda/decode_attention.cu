// decode_attention: one query token per (batch, query head) attending over its KV head's live cache rows.
//
// Flash-decoding: block = (batch, KV head, tile of up to kGT query heads of its GQA group, split of the cache
// length). All query heads of the tile share every K/V row the block reads. A block walks its split in tiles of
// kTileRows rows:
//   scores  4 lanes per row, 1-2 rows per thread, all kGT heads at once, reduced with a transposed shuffle sum
//   softmax warp g updates head g's running max / sum and turns the tile's scores into weights
//   values  thread = (16-byte column of V, row slice): each V vector is loaded once per block, acc[kGT][vec]
// Row slices are summed through shared memory once per split (deterministic order). With several splits, a
// merge kernel combines the per-split (max, sum, unnormalised output) kept in float32 scratch. The split count is
// chosen on the host from C, the block count and the SM count (never from lengths: no sync).
#include <algorithm>
#include <cmath>
#include <limits>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_utils.cuh"
#include "dispatch.h"

namespace attngate {
namespace {

constexpr int kThreads = 256;
constexpr int kLanesPerRow = 4;
constexpr int kSplitAlign = 128;  // split lengths are a multiple of every kernel's tile
constexpr int kMaxD = 256;
constexpr int kMaxRowSlices = 16;
constexpr int kMaxSplits = 128;
constexpr int kMinSplitRows = 256;
constexpr int kMergeThreads = 128;

struct DecodeParams {
  int64_t q_sb, q_sh;           // query strides
  int64_t kc_sb, kc_sh, kc_sc;  // key_cache strides
  int64_t vc_sb, vc_sh, vc_sc;  // value_cache strides
  int64_t len_sb, len_sh;       // lengths strides
  int64_t H, Hq, group, ntiles, C, split_rows;
  int D, nvec, nsplit;
  float scale;
};

template <typename scalar_t, bool kVector, int kGT>
__global__ void __launch_bounds__(kThreads, 2) decode_attention_kernel(
    const scalar_t* __restrict__ query,        // (B, Hq, D)
    const scalar_t* __restrict__ key_cache,    // (B, H, C, D)
    const scalar_t* __restrict__ value_cache,  // (B, H, C, D)
    const int32_t* __restrict__ lengths,       // (B, H)
    scalar_t* __restrict__ out,                // (B, Hq, D) contiguous; written here when nsplit == 1
    float2* __restrict__ part_ml,              // (B * Hq, nsplit) running (max, sum) of each split
    float* __restrict__ part_out,              // (B * Hq, nsplit, D) unnormalised output of each split
    int32_t* __restrict__ status,              // (1) zeroed
    const DecodeParams p) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  // Score-phase rows per thread: 2, or 1 with 8 heads so that everything fits in 128 registers.
  constexpr int kRowsPerThread = kGT >= 8 ? 1 : 2;
  constexpr int kTileRows = kThreads / kLanesPerRow * kRowsPerThread;
  static_assert(kSplitAlign % kTileRows == 0, "splits hold whole tiles");
  constexpr int kN = kRowsPerThread * kGT;  // dot products per thread, index rr * kGT + g
  constexpr int kHeld = kN >= kLanesPerRow ? kN / kLanesPerRow : 1;
  constexpr int kGV = kVec > 1 && kGT > 4 ? 4 : kGT;  // query heads per value-phase thread
  constexpr int kGroupsV = kGT / kGV;
  __shared__ __align__(16) float q_s[kGT * kMaxD];  // scaled query rows, pitch D
  __shared__ float w_s[kGT * kTileRows];            // scores, then softmax weights, of the tile
  __shared__ float red_s[kGT * kMaxD];
  __shared__ float m_s[kGT], l_s[kGT], alpha_s[kGT];

  const int64_t blk = blockIdx.x;
  const int split = static_cast<int>(blk % p.nsplit);
  const int64_t rest = blk / p.nsplit;
  const int64_t tile = rest % p.ntiles;
  const int64_t bh = rest / p.ntiles;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t qh0 = h * p.group + tile * kGT;
  const int gt = static_cast<int>(std::min<int64_t>(kGT, p.group - tile * kGT));
  const int D = p.D, nvec = p.nvec;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int i = tid; i < kGT * D; i += kThreads) {
    const int g = i / D, d = i - g * D;
    q_s[i] = g < gt ? static_cast<float>(query[b * p.q_sb + (qh0 + g) * p.q_sh + d]) * p.scale : 0.f;
  }
  if (tid < kGT) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  int64_t len = lengths[b * p.len_sb + h * p.len_sh];
  if (len < 0 || len > p.C) {
    if (tid == 0 && split == 0 && tile == 0) atomicOr(status, kStatusLengthOutOfRange);
    len = len < 0 ? 0 : p.C;  // reported; the clamp only keeps the reads in bounds
  }
  const int64_t r_begin = static_cast<int64_t>(split) * p.split_rows;
  const int64_t r_end = std::min<int64_t>(len, r_begin + p.split_rows);
  __syncthreads();

  const scalar_t* kbase = key_cache + b * p.kc_sb + h * p.kc_sh;
  const scalar_t* vbase = value_cache + b * p.vc_sb + h * p.vc_sh;
  const int sub = tid / kLanesPerRow, sl = tid % kLanesPerRow;  // score phase: row group and lane in row
  // Value phase: thread = (column vector, group of kGV heads, row slice). Splitting the heads of a vector tile
  // over two threads bounds acc at 32 floats (no spills at 128 registers); the second read of the V vector is
  // an L1 hit.
  const int vcol = tid % nvec, vg0 = (tid / nvec) % kGroupsV * kGV, slice = tid / nvec / kGroupsV;
  const int fit_slices = kThreads / (nvec * kGroupsV);  // >= 1 since D <= kMaxD
  const int row_slices = fit_slices < kMaxRowSlices ? fit_slices : kMaxRowSlices;
  const bool v_active = slice < row_slices;
  float acc[kGV][kVec];
#pragma unroll
  for (int j = 0; j < kGV; ++j)
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[j][i] = 0.f;

  for (int64_t t0 = r_begin; t0 < r_end; t0 += kTileRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kTileRows, r_end - t0));
    // Scores: thread (sub, sl) covers rows sub and sub + 64 of the tile, vectors sl, sl + 4, ... of each row.
    float dot[kN];
#pragma unroll
    for (int i = 0; i < kN; ++i) dot[i] = 0.f;
#pragma unroll 2
    for (int v = sl; v < nvec; v += kLanesPerRow) {
      if constexpr (kVec > 1) {
        uint4 raw[kRowsPerThread];  // converted four elements at a time to keep register pressure down
#pragma unroll
        for (int rr = 0; rr < kRowsPerThread; ++rr) {
          const int r = sub + rr * (kThreads / kLanesPerRow);
          raw[rr] = cuda::load_raw16(kbase + (t0 + r) * p.kc_sc + v * kVec, r < nr);
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
          const int r = sub + rr * (kThreads / kLanesPerRow);
          kf[rr] = r < nr ? static_cast<float>(kbase[(t0 + r) * p.kc_sc + v]) : 0.f;
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
    // Lane sl now holds the sums of indices sl * kN / 4 + [0, kN / 4) (kN >= 4), or index sl / 2 (kN == 2).
    if (kN >= kLanesPerRow || (sl & 1) == 0) {
#pragma unroll
      for (int i = 0; i < kHeld; ++i) {
        const int idx = kN >= kLanesPerRow ? sl * kHeld + i : sl / 2;
        const int rr = idx / kGT, g = idx % kGT;
        const int r = sub + rr * (kThreads / kLanesPerRow);
        w_s[g * kTileRows + r] = r < nr ? dot[i] : -INFINITY;
      }
    }
    __syncthreads();

    if (warp < kGT) {  // online softmax of head g = warp over the tile
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
        const float e = s[j] == -INFINITY ? 0.f : expf(s[j] - m_new);  // also keeps -inf - -inf out
        w_s[warp * kTileRows + lane + 32 * j] = e;
        sum += e;
      }
      sum = cuda::warp_sum(sum);
      __syncwarp();
      if (lane == 0) {
        const float alpha = m_old == -INFINITY ? 0.f : expf(m_old - m_new);
        alpha_s[warp] = alpha;
        l_s[warp] = l_s[warp] * alpha + sum;
        m_s[warp] = m_new;
      }
    }
    __syncthreads();

    if (v_active) {
#pragma unroll
      for (int j = 0; j < kGV; ++j) {
        const float alpha = alpha_s[vg0 + j];
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[j][i] *= alpha;
      }
#pragma unroll 4
      for (int r = slice; r < nr; r += row_slices) {
        float vf[kVec];
        cuda::load_as_float<scalar_t, kVec>(vbase + (t0 + r) * p.vc_sc + vcol * kVec, vf);
#pragma unroll
        for (int j = 0; j < kGV; ++j) {
          const float w = w_s[(vg0 + j) * kTileRows + r];
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[j][i] += w * vf[i];
        }
      }
    }
    __syncthreads();  // w_s and alpha_s are rewritten by the next tile
  }

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
    if (p.nsplit == 1) {
      const float l = l_s[g];
      out[(out_row0 + g) * D + d] = static_cast<scalar_t>(l > 0.f ? red_s[i] / l : 0.f);
    } else {
      part_out[((out_row0 + g) * p.nsplit + split) * D + d] = red_s[i];
    }
  }
  if (p.nsplit > 1 && tid < gt) part_ml[(out_row0 + tid) * p.nsplit + split] = make_float2(m_s[tid], l_s[tid]);
}

// Combines the splits of one (batch, query head): out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s.
template <typename scalar_t>
__global__ void __launch_bounds__(kMergeThreads) decode_merge_kernel(
    const float2* __restrict__ part_ml,  // (B * Hq, nsplit)
    const float* __restrict__ part_out,  // (B * Hq, nsplit, D)
    scalar_t* __restrict__ out,          // (B * Hq, D)
    int nsplit, int D) {
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
  for (int d = threadIdx.x; d < D; d += kMergeThreads) {
    float acc = 0.f;
    for (int s = 0; s < nsplit; ++s) acc += weight_s[s] * src[static_cast<int64_t>(s) * D + d];
    out[row * D + d] = static_cast<scalar_t>(acc * inv_l_s);
  }
}

template <typename scalar_t, bool kVector, int kGT>
void launch_decode(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                   const at::Tensor& lengths, at::Tensor& out, float2* part_ml, float* part_out, int32_t* status,
                   const DecodeParams& p, int64_t blocks, cudaStream_t stream) {
  decode_attention_kernel<scalar_t, kVector, kGT><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      query.data_ptr<scalar_t>(), key_cache.data_ptr<scalar_t>(), value_cache.data_ptr<scalar_t>(),
      lengths.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), part_ml, part_out, status, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor decode_attention_cuda(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& lengths, double scale) {
  check_decode_attention_args(query, key_cache, value_cache, lengths, scale);
  const int64_t B = key_cache.size(0), H = key_cache.size(1), C = key_cache.size(2), D = key_cache.size(3);
  const int64_t Hq = query.size(1);
  TORCH_CHECK(D <= kMaxD, "decode_attention: the CUDA kernel supports head dim D <= ", kMaxD, ", got ", D);
  at::Tensor out = at::empty({B, Hq, D}, query.options());
  if (B * Hq == 0 || D == 0) return out;

  const at::cuda::OptionalCUDAGuard device_guard(device_of(query));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t group = Hq / H;
  const int gt = group == 1 ? 1 : (group <= 4 ? 4 : 8);
  const int64_t ntiles = cuda::ceil_div(group, gt);
  const int64_t base_blocks = B * H * ntiles;

  // About four blocks per SM in total, each split at least kMinSplitRows rows of the capacity.
  int64_t nsplit = 1, split_rows = kSplitAlign;
  if (C > 0) {
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    nsplit = std::min(cuda::ceil_div(4 * sms, base_blocks), cuda::ceil_div(C, kMinSplitRows));
    nsplit = std::max<int64_t>(1, std::min<int64_t>(nsplit, kMaxSplits));
    split_rows = cuda::round_up(cuda::ceil_div(C, nsplit), kSplitAlign);
    nsplit = cuda::ceil_div(C, split_rows);
  }
  const int64_t blocks = base_blocks * nsplit;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "decode_attention: too many (batch, head, split) blocks: ",
              blocks);

  const at::Tensor scratch = cuda::make_status_scratch(key_cache, 0, 1);
  at::Tensor partials;
  float2* part_ml = nullptr;
  float* part_out = nullptr;
  if (nsplit > 1) {
    // (max, sum) pairs first, so that they stay 8-byte aligned.
    partials = at::empty({B * Hq * nsplit * (2 + D)}, query.options().dtype(at::kFloat));
    part_ml = reinterpret_cast<float2*>(partials.data_ptr<float>());
    part_out = partials.data_ptr<float>() + 2 * B * Hq * nsplit;
  }

  const bool vec = rows_aligned_for(16, {&key_cache, &value_cache});
  ATTNGATE_DISPATCH_FLOATING_TYPES(query.scalar_type(), "decode_attention_cuda", [&] {
    DecodeParams p;
    p.q_sb = query.stride(0), p.q_sh = query.stride(1);
    p.kc_sb = key_cache.stride(0), p.kc_sh = key_cache.stride(1), p.kc_sc = key_cache.stride(2);
    p.vc_sb = value_cache.stride(0), p.vc_sh = value_cache.stride(1), p.vc_sc = value_cache.stride(2);
    p.len_sb = lengths.stride(0), p.len_sh = lengths.stride(1);
    p.H = H, p.Hq = Hq, p.group = group, p.ntiles = ntiles, p.C = C, p.split_rows = split_rows;
    p.D = static_cast<int>(D);
    p.nvec = static_cast<int>(vec ? D / (16 / static_cast<int64_t>(sizeof(scalar_t))) : D);
    p.nsplit = static_cast<int>(nsplit);
    p.scale = static_cast<float>(scale);
    auto launch = [&](auto vec_tag, auto gt_tag) {
      launch_decode<scalar_t, decltype(vec_tag)::value, decltype(gt_tag)::value>(
          query, key_cache, value_cache, lengths, out, part_ml, part_out, scratch.data_ptr<int32_t>(), p, blocks,
          stream);
    };
    auto launch_gt = [&](auto vec_tag) {
      if (gt == 1) {
        launch(vec_tag, std::integral_constant<int, 1>{});
      } else if (gt == 4) {
        launch(vec_tag, std::integral_constant<int, 4>{});
      } else {
        launch(vec_tag, std::integral_constant<int, 8>{});
      }
    };
    if (vec) {
      launch_gt(std::true_type{});
    } else {
      launch_gt(std::false_type{});
    }
    if (nsplit > 1) {
      decode_merge_kernel<scalar_t><<<static_cast<unsigned>(B * Hq), kMergeThreads, 0, stream>>>(
          part_ml, part_out, out.data_ptr<scalar_t>(), static_cast<int>(nsplit), static_cast<int>(D));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  cuda::check_status("decode_attention", scratch);
  return out;
}

}  // namespace attngate

TORCH_LIBRARY_IMPL(attngate, CUDA, m) { m.impl("decode_attention", &attngate::decode_attention_cuda); }
