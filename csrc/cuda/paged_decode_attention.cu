// paged_decode_attention: flash-decoding through the page table.
//
// Block = (b, KV head, tile of up to kGT query heads of its GQA group, split). A head's rows form a stream of
// tiles of kTileRows rows: its paged rows, then its extra rows. Split s takes tiles s, s + nsplit, ..., so every
// split gets an even share of any length: the split count comes from the SM count and the occupancy only (lengths
// stay on the device, no host sync). Per tile:
//   rows     threads [0, 64) look up the tile's rows (page id checked: a bad one is reported and its row skipped),
//            threads [64, 128) prefetch the rows of the split's next tile into L2
//   scores   8 lanes per row, 16-byte vector loads, every query head of the block per K vector (GQA sharing)
//   softmax  one warp per head: running max / sum, weights of the tile
//   values   thread = (head, column vector[, row slice]); slices summed in a fixed order; running output in smem
// decode_attention's merge kernel combines the splits in split order (deterministic).
#include <algorithm>
#include <limits>

#include "checks.h"
#include "cuda/decode_common.cuh"
#include "cuda/paged_attention_device.cuh"
#include "cuda/paged_attention_kernels.cuh"
#include "cuda/paged_decode_tiles.cuh"
#include "cuda/stable_cuda.cuh"
#include "cuda_utils.cuh"
#include "dispatch.h"
#include "paged_attention_checks.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

using namespace paged_decode;  // block shape, parameters, row stream and score phase (paged_decode_tiles.cuh)

template <typename scalar_t, bool kVector, int kGT>
__global__ void __launch_bounds__(kThreads, 4) paged_decode_kernel(
    const scalar_t* __restrict__ query,        // (B, Hq, D)
    const scalar_t* __restrict__ key_pages,    // (P, S, D)
    const scalar_t* __restrict__ value_pages,  // (P, S, D)
    const int32_t* __restrict__ page_table,    // (B, H, M)
    const int32_t* __restrict__ lengths,       // (B, H)
    const scalar_t* __restrict__ extra_key,    // (B, H, E, D) or null
    const scalar_t* __restrict__ extra_value,  // (B, H, E, D) or null
    const bool* __restrict__ extra_valid,      // (B, H, E) or null
    scalar_t* __restrict__ out,                // (B, Hq, D) contiguous; written here when nsplit == 1
    float2* __restrict__ part_ml,              // (B * Hq, nsplit) (max, sum) of each split
    float* __restrict__ part_out,              // (B * Hq, nsplit, D) unnormalised output of each split
    int32_t* __restrict__ status,              // (1)
    const DecodeParams p) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  extern __shared__ __align__(16) float smem[];  // q_s (kGT, D) scaled queries, then o_s (kGT, D) running output
  __shared__ const scalar_t* krow_s[kTileRows];
  __shared__ const scalar_t* vrow_s[kTileRows];
  __shared__ float w_s[kGT][kTileRows];
  __shared__ float red_s[kThreads * (kVector ? kVec : 1)];  // row-slice partials of the value phase
  __shared__ float m_s[kGT], l_s[kGT], alpha_s[kGT];
  const int D = p.D, nvec = p.nvec, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float* q_s = smem;
  float* o_s = smem + kGT * D;

  const int64_t blk = blockIdx.x;
  const int split = static_cast<int>(blk % p.nsplit);
  const int64_t gtile = (blk / p.nsplit) % p.gtiles, bh = blk / p.nsplit / p.gtiles;
  const int64_t b = bh / p.H, h = bh % p.H, qh0 = h * p.group + gtile * kGT;
  const int gt = static_cast<int>(min(static_cast<int64_t>(kGT), p.group - gtile * kGT));
  for (int i = tid; i < kGT * D; i += kThreads) {
    const int g = i / D, d = i - g * D;
    q_s[i] = g < gt ? static_cast<float>(query[b * p.q_b + (qh0 + g) * p.q_h + d]) * p.scale : 0.f;
    o_s[i] = 0.f;
  }
  if (tid < kGT) m_s[tid] = -INFINITY, l_s[tid] = 0.f;
  int64_t len = lengths[b * p.len_b + h * p.len_h];
  if (len < 0 || len > p.capacity) {
    if (tid == 0 && split == 0 && gtile == 0) atomicOr(status, kStatusLengthOutOfRange);
    len = len < 0 ? 0 : p.capacity;  // reported; the clamp only keeps the reads in bounds
  }
  const int64_t tiles_paged = (len + kTileRows - 1) / kTileRows;
  const int64_t tiles = tiles_paged + (p.E + kTileRows - 1) / kTileRows;
  const int units = kGT * nvec;  // value phase: (head, column vector) pairs
  const int slices = units >= kThreads ? 1 : min(kThreads / units, kTileRows);
  __syncthreads();

  for (int64_t tile = split; tile < tiles; tile += p.nsplit) {
    if (tid < kTileRows) {
      stream_row(p, key_pages, value_pages, page_table, extra_key, extra_value, extra_valid, b, h, len, tiles_paged,
                 tile, tid, gtile == 0, status, krow_s[tid], vrow_s[tid]);
    } else if (tile + p.nsplit < tiles) {  // warm L2 with the rows of this split's next tile
      const scalar_t *kr, *vr;
      stream_row(p, key_pages, value_pages, page_table, extra_key, extra_value, extra_valid, b, h, len, tiles_paged,
                 tile + p.nsplit, tid - kTileRows, false, status, kr, vr);
      if (kr != nullptr) {
        for (int off = 0; off < D * static_cast<int>(sizeof(scalar_t)); off += 128) {
          asm volatile("prefetch.global.L2 [%0];" ::"l"(reinterpret_cast<const char*>(kr) + off));
          asm volatile("prefetch.global.L2 [%0];" ::"l"(reinterpret_cast<const char*>(vr) + off));
        }
      }
    }
    __syncthreads();

    tile_scores<scalar_t, kVector, kGT>(krow_s, q_s, D, nvec, tid, w_s);
    __syncthreads();

    for (int g = warp; g < kGT; g += kThreads / 32) {  // online softmax of head g over the tile
      float w[2] = {w_s[g][lane], w_s[g][lane + 32]};
      paged_device::warp_softmax_step(w, &m_s[g], &l_s[g], &alpha_s[g], lane);
      w_s[g][lane] = w[0];
      w_s[g][lane + 32] = w[1];
    }
    __syncthreads();

    // Values: thread = (head g, column vector c, row slice); acc over the slice's rows of the tile.
    for (int u0 = 0; u0 < units; u0 += kThreads) {
      const int u = u0 + tid % (slices > 1 ? units : kThreads), slice = slices > 1 ? tid / units : 0;
      const bool active = u < units && slice < slices;
      const int g = u / nvec, c = u - g * nvec;
      float acc[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = 0.f;
      if (active) {
        for (int r = slice; r < kTileRows; r += slices) {
          const scalar_t* row = vrow_s[r];
          if (row == nullptr) continue;
          float vf[kVec];
          cuda::load_as_float<scalar_t, kVec>(row + c * kVec, vf);
          const float w = w_s[g][r];
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[i] += w * vf[i];
        }
      }
      if (slices == 1) {
        if (active) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) {
            float* o = o_s + g * D + c * kVec + i;
            *o = *o * alpha_s[g] + acc[i];
          }
        }
      } else {  // slices > 1 only when units < kThreads: this loop runs once and every thread reaches the barriers
        if (active) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) red_s[slice * units * kVec + u * kVec + i] = acc[i];
        }
        __syncthreads();
        for (int e = tid; e < units * kVec; e += kThreads) {
          float sum = 0.f;
          for (int s = 0; s < slices; ++s) sum += red_s[s * units * kVec + e];  // fixed order: deterministic
          o_s[e] = o_s[e] * alpha_s[e / D] + sum;
        }
      }
    }
    __syncthreads();  // krow_s, w_s, alpha_s and red_s are rewritten by the next tile
  }

  const int64_t row0 = b * p.Hq + qh0;
  for (int i = tid; i < gt * D; i += kThreads) {
    const int g = i / D, d = i - g * D;
    if (p.nsplit == 1) {
      out[(row0 + g) * D + d] = static_cast<scalar_t>(l_s[g] > 0.f ? o_s[i] / l_s[g] : 0.f);
    } else {
      part_out[((row0 + g) * p.nsplit + split) * D + d] = o_s[i];
    }
  }
  // The merge (decode::decode_merge_kernel, shared with decode_attention) works in the natural-log domain.
  if (p.nsplit > 1 && tid < gt) part_ml[(row0 + tid) * p.nsplit + split] = make_float2(m_s[tid] * kLn2, l_s[tid]);
}

template <typename T>
const T* data_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? t->mutable_data_ptr<T>() : nullptr;
}

}  // namespace

void launch_paged_decode_attention(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                   const Tensor& page_table, const Tensor& lengths, double scale,
                                   const std::optional<Tensor>& extra_key, const std::optional<Tensor>& extra_value,
                                   const std::optional<Tensor>& extra_valid, Tensor& out, int32_t* status) {
  const int64_t B = page_table.size(0), H = page_table.size(1), M = page_table.size(2);
  const int64_t P = key_pages.size(0), S = key_pages.size(1), D = key_pages.size(2), Hq = query.size(1);
  if (out.numel() == 0) return;
  const int64_t group = Hq / H, E = extra_key.has_value() ? extra_key->size(2) : 0;
  const cuda::DeviceFacts* props = &cuda::device_facts();
  const cudaStream_t stream = cuda::current_stream();
  int gt = group == 1 ? 1 : group == 2 ? 2 : group <= 4 ? 4 : 8;
  const int64_t smem_limit = static_cast<int64_t>(props->sharedMemPerBlockOptin) - 8 * 1024;  // static smem
  while (gt > 1 && 2 * gt * D * 4 > smem_limit) gt /= 2;
  const int64_t dyn_smem = 2 * gt * D * 4;
  AG_CHECK(dyn_smem <= smem_limit, "paged_decode_attention: head dim D = ", D,
           " is too large for the CUDA kernel's shared memory on this device");
  const bool vec = rows_aligned_for(16, {&key_pages, &value_pages}) &&
                   (!extra_key.has_value() || rows_aligned_for(16, {&*extra_key, &*extra_value}));

  DecodeParams p;
  p.q_b = query.stride(0), p.q_h = query.stride(1);
  p.kp_p = key_pages.stride(0), p.kp_s = key_pages.stride(1);
  p.vp_p = value_pages.stride(0), p.vp_s = value_pages.stride(1);
  p.pt_b = page_table.stride(0), p.pt_h = page_table.stride(1), p.pt_m = page_table.stride(2);
  p.len_b = lengths.stride(0), p.len_h = lengths.stride(1);
  p.ek_b = p.ek_h = p.ek_e = p.ev_b = p.ev_h = p.ev_e = p.evd_b = p.evd_h = p.evd_e = 0;
  if (E > 0) {
    p.ek_b = extra_key->stride(0), p.ek_h = extra_key->stride(1), p.ek_e = extra_key->stride(2);
    p.ev_b = extra_value->stride(0), p.ev_h = extra_value->stride(1), p.ev_e = extra_value->stride(2);
    if (extra_valid.has_value()) {
      p.evd_b = extra_valid->stride(0), p.evd_h = extra_valid->stride(1), p.evd_e = extra_valid->stride(2);
    }
  }
  p.H = H, p.Hq = Hq, p.group = group, p.gtiles = cuda::ceil_div(group, gt), p.P = P, p.S = S;
  p.capacity = M * S, p.E = E, p.D = static_cast<int>(D);
  p.scale = static_cast<float>(scale) * paged_device::kLog2e;
  const int64_t base_blocks = B * H * p.gtiles;
  const int64_t max_tiles = cuda::ceil_div(M * S, kTileRows) + cuda::ceil_div(E, kTileRows);

  ATTNGATE_DISPATCH_FLOATING_TYPES(query.scalar_type(), "paged_decode_attention_cuda", [&] {
    p.nvec = static_cast<int>(vec ? D / cuda::vec_elems<scalar_t, true>() : D);
    auto launch = [&](auto vec_tag, auto gt_tag) {
      auto kernel = paged_decode_kernel<scalar_t, decltype(vec_tag)::value, decltype(gt_tag)::value>;
      if (dyn_smem > 32 * 1024) {  // past 48 KiB with the static part: opt in
        STD_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn_smem)));
      }
      int per_sm = 1;
      STD_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, dyn_smem));
      const int64_t target = static_cast<int64_t>(std::max(per_sm, 1)) * props->multiProcessorCount;
      const int64_t nsplit = std::clamp<int64_t>(cuda::ceil_div(target, base_blocks), 1,
                                                 std::clamp<int64_t>(max_tiles, 1, decode::kMaxSplits));
      p.nsplit = static_cast<int>(nsplit);
      const int64_t blocks = base_blocks * nsplit;
      AG_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "paged_decode_attention: too many blocks: ", blocks);
      Tensor partials;
      float2* part_ml = nullptr;
      float* part_out = nullptr;
      if (nsplit > 1) {  // (max, sum) pairs first, so that they stay 8-byte aligned
        partials = empty_like_device({B * Hq * nsplit * (2 + D)}, kFloat, query);
        part_ml = reinterpret_cast<float2*>(partials.mutable_data_ptr<float>());
        part_out = partials.mutable_data_ptr<float>() + 2 * B * Hq * nsplit;
      }
      kernel<<<static_cast<unsigned>(blocks), kThreads, dyn_smem, stream>>>(
          query.mutable_data_ptr<scalar_t>(), key_pages.mutable_data_ptr<scalar_t>(),
          value_pages.mutable_data_ptr<scalar_t>(), page_table.mutable_data_ptr<int32_t>(),
          lengths.mutable_data_ptr<int32_t>(), data_or_null<scalar_t>(extra_key), data_or_null<scalar_t>(extra_value),
          E > 0 ? data_or_null<bool>(extra_valid) : nullptr, out.mutable_data_ptr<scalar_t>(), part_ml, part_out,
          status, p);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
      if (nsplit > 1) {
        decode::decode_merge_kernel<scalar_t><<<static_cast<unsigned>(B * Hq), decode::kMergeThreads, 0, stream>>>(
            part_ml, part_out, out.mutable_data_ptr<scalar_t>(), static_cast<int>(nsplit), D);
        STD_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    auto launch_gt = [&](auto vec_tag) {
      switch (gt) {
        case 1: launch(vec_tag, std::integral_constant<int, 1>{}); break;
        case 2: launch(vec_tag, std::integral_constant<int, 2>{}); break;
        case 4: launch(vec_tag, std::integral_constant<int, 4>{}); break;
        default: launch(vec_tag, std::integral_constant<int, 8>{}); break;
      }
    };
    if (vec) {
      launch_gt(std::true_type{});
    } else {
      launch_gt(std::false_type{});
    }
  });
}

Tensor paged_decode_attention_cuda(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                   const Tensor& page_table, const Tensor& lengths, double scale,
                                   const std::optional<Tensor>& extra_key, const std::optional<Tensor>& extra_value,
                                   const std::optional<Tensor>& extra_valid) {
  check_paged_decode_attention_args(query, key_pages, value_pages, page_table, lengths, scale, extra_key, extra_value,
                                    extra_valid);
  const cuda::DeviceGuard device_guard(query);
  Tensor out = empty_like_device(query.sizes(), query.scalar_type(), query);
  const Tensor scratch = cuda::make_status_scratch(key_pages, 0, 1);
  launch_paged_decode_attention(query, key_pages, value_pages, page_table, lengths, scale, extra_key, extra_value,
                                extra_valid, out, scratch.mutable_data_ptr<int32_t>());
  cuda::check_status("paged_decode_attention", scratch);
  return out;
}

ATTNGATE_IMPL(CUDA, paged_decode_attention, paged_decode_attention_cuda);

}  // namespace attngate
