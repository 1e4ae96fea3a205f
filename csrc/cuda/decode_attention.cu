// decode_attention: one query token per (batch, query head) attending over its KV head's live cache rows.
//
// Two kernels, any head dim D:
//   decode_tiled_kernel (decode_tiled.cuh)  the fast path: GQA tiles sharing every K/V row, cp.async staging
//   decode_wide_kernel  (decode_wide.cuh)   rows the tiled kernel cannot map or stage (see pick_layout)
// both split the live rows of a head across blocks when there are too few (batch, head) blocks to fill the GPU;
// decode_merge_kernel then combines the splits.
//
// Grid size. The lengths live on the device and are never read back, so the number of splits per head,
// nsplit, is chosen on the host from what it knows: the resident blocks per SM of the chosen kernel at its
// shared memory (cudaOccupancyMaxActiveBlocksPerMultiprocessor), the SM count, the (batch, head, tile) block
// count, and the capacity C (no more than C / kMinSplitRows splits). It targets one full wave of resident
// blocks. The rows are then divided on the device from each head's real length: a head uses
// min(nsplit, len / kMinSplitRows) equal splits, so a short head does not pay for splits of the capacity and a
// long one spreads over all of them; unused splits exit at once and weigh nothing in the merge.
#include <algorithm>
#include <cmath>
#include <limits>

#include "checks.h"
#include "cuda/stable_cuda.cuh"
#include "cuda_utils.cuh"
#include "decode_common.cuh"
#include "decode_tiled.cuh"
#include "decode_wide.cuh"
#include "dispatch.h"
#include "launch_cache.cuh"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

using decode::DecodeParams;
using decode::kThreads;

template <typename scalar_t>
using DecodeKernel = void (*)(const scalar_t*, const scalar_t*, const scalar_t*, const int32_t*, scalar_t*, float2*,
                              float*, int32_t*, DecodeParams);

// How one call runs: which kernel, its shared memory and the offsets inside it.
struct Layout {
  bool wide = false;
  int gt = 1;               // query heads per tile: 1, 4 or 8
  int rows_per_thread = 1;  // 2: 128-row tiles, 1: 64-row tiles
  size_t smem = 0;          // dynamic shared memory bytes (tiled kernel)
};

int64_t round16(int64_t bytes) { return cuda::round_up(bytes, 16); }

// Chooses the kernel and, for the tiled kernel, fills the shared-memory layout of p.
Layout pick_layout(DecodeParams& p, int64_t group, int64_t D, int64_t elem, bool vec, int64_t smem_optin) {
  Layout l;
  l.gt = group == 1 ? 1 : (group <= 4 ? 4 : 8);
  const int64_t row_bytes = D * elem;
  // 128-row tiles when a staged K + V tile stays small; 8-head tiles always use 64 rows (register budget).
  l.rows_per_thread = l.gt < 8 && (!vec || row_bytes <= 256) ? 2 : 1;
  const int64_t tile_rows = (kThreads / decode::kLanesPerRow) * l.rows_per_thread;
  const int64_t nvec = vec ? D / (16 / elem) : D;
  const int64_t groups_v = l.gt / decode::value_heads(l.gt, vec ? static_cast<int>(16 / elem) : 1);
  const int64_t pitch_bytes = row_bytes + 16;  // one 16-byte pad per staged row: at most 2-way bank conflicts
  const int64_t q_bytes = round16(l.gt * D * 4), w_bytes = round16(l.gt * tile_rows * 4);
  const int64_t k_bytes = vec ? round16(std::max(tile_rows * pitch_bytes, l.gt * D * 4)) : 0;
  const int64_t v_bytes = vec ? round16(tile_rows * pitch_bytes) : 0;
  const int64_t red_bytes = vec ? 0 : q_bytes;  // the vector path reduces into the key staging buffer
  const int64_t smem = q_bytes + w_bytes + k_bytes + v_bytes + red_bytes;
  // 1 KiB of margin for the kernel's static shared memory and the per-block reservation.
  l.wide = nvec * groups_v > kThreads || smem + 1024 > smem_optin;
  if (l.wide) return l;
  p.w_off = static_cast<int>(q_bytes);
  p.k_off = static_cast<int>(q_bytes + w_bytes);
  p.v_off = static_cast<int>(q_bytes + w_bytes + k_bytes);
  p.red_off = vec ? p.k_off : static_cast<int>(q_bytes + w_bytes + k_bytes + v_bytes);
  p.pitch = static_cast<int>(pitch_bytes / elem);
  p.nvec = static_cast<int>(nvec);
  l.smem = static_cast<size_t>(smem);
  return l;
}

template <typename scalar_t>
DecodeKernel<scalar_t> pick_kernel(const Layout& l, bool vec) {
  using namespace decode;
  if (l.wide) return vec ? decode_wide_kernel<scalar_t, true> : decode_wide_kernel<scalar_t, false>;
  if (!vec) {  // the scalar path reads global memory directly: 128-row tiles unless 8 heads
    if (l.gt == 1) return decode_tiled_kernel<scalar_t, false, 1, 2>;
    if (l.gt == 4) return decode_tiled_kernel<scalar_t, false, 4, 2>;
    return decode_tiled_kernel<scalar_t, false, 8, 1>;
  }
  if (l.gt == 1) {
    return l.rows_per_thread == 2 ? decode_tiled_kernel<scalar_t, true, 1, 2> : decode_tiled_kernel<scalar_t, true, 1, 1>;
  }
  if (l.gt == 4) {
    return l.rows_per_thread == 2 ? decode_tiled_kernel<scalar_t, true, 4, 2> : decode_tiled_kernel<scalar_t, true, 4, 1>;
  }
  return decode_tiled_kernel<scalar_t, true, 8, 1>;
}

}  // namespace

Tensor decode_attention_cuda(const Tensor& query, const Tensor& key_cache, const Tensor& value_cache,
                             const Tensor& lengths, double scale) {
  check_decode_attention_args(query, key_cache, value_cache, lengths, scale);
  const int64_t B = key_cache.size(0), H = key_cache.size(1), C = key_cache.size(2), D = key_cache.size(3);
  const int64_t Hq = query.size(1);
  Tensor out = empty_like_device({B, Hq, D}, query.scalar_type(), query);
  if (B * Hq == 0 || D == 0) return out;

  const cuda::DeviceGuard device_guard(query);
  const cudaStream_t stream = cuda::current_stream();
  const cuda::DeviceFacts* props = &cuda::device_facts();
  const int64_t group = Hq / H;
  const int64_t elem = static_cast<int64_t>(key_cache.element_size());
  // The tiled kernel reads the query as scalars; the wide kernel reads it with the rows' vector width too.
  const bool vec_kv = rows_aligned_for(16, {&key_cache, &value_cache});

  DecodeParams p{};
  p.q_sb = query.stride(0), p.q_sh = query.stride(1);
  p.kc_sb = key_cache.stride(0), p.kc_sh = key_cache.stride(1), p.kc_sc = key_cache.stride(2);
  p.vc_sb = value_cache.stride(0), p.vc_sh = value_cache.stride(1), p.vc_sc = value_cache.stride(2);
  p.len_sb = lengths.stride(0), p.len_sh = lengths.stride(1);
  p.H = H, p.Hq = Hq, p.group = group, p.C = C;
  p.D = D;
  p.scale = static_cast<float>(scale);
  Layout layout = pick_layout(p, group, D, elem, vec_kv, static_cast<int64_t>(props->sharedMemPerBlockOptin));
  const bool vec = layout.wide ? vec_kv && rows_aligned_for(16, {&query}) : vec_kv;
  if (layout.wide) p.ncol = static_cast<int>(cuda::ceil_div(D, kThreads * (vec ? 16 / elem : 1)));
  p.ntiles = layout.wide ? 1 : cuda::ceil_div(group, layout.gt);
  const int64_t base_blocks = layout.wide ? B * Hq * p.ncol : B * H * p.ntiles;

  ATTNGATE_DISPATCH_FLOATING_TYPES(query.scalar_type(), "decode_attention_cuda", [&] {
    const DecodeKernel<scalar_t> kernel = pick_kernel<scalar_t>(layout, vec);
    cuda::ensure_dynamic_smem(reinterpret_cast<const void*>(kernel), layout.smem);
    const int per_sm = cuda::blocks_per_sm(reinterpret_cast<const void*>(kernel), kThreads, layout.smem);
    // One full wave of resident blocks, each split at least kMinSplitRows rows of the capacity.
    int64_t nsplit = cuda::ceil_div(static_cast<int64_t>(props->multiProcessorCount) * std::max(per_sm, 1),
                                    base_blocks);
    nsplit = std::min<int64_t>({nsplit, cuda::ceil_div(C, decode::kMinSplitRows), decode::kMaxSplits});
    nsplit = std::max<int64_t>(nsplit, 1);
    p.nsplit = static_cast<int>(nsplit);
    const int64_t blocks = base_blocks * nsplit;
    AG_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
             "decode_attention: too many (batch, head, split) blocks: ", blocks);

    const Tensor scratch = cuda::make_status_scratch(key_cache, 0, 1);
    Tensor partials;
    float2* part_ml = nullptr;
    float* part_out = nullptr;
    if (nsplit > 1) {
      // (max, sum) pairs first, so that they stay 8-byte aligned.
      partials = empty_like_device({B * Hq * nsplit * (2 + D)}, kFloat, query);
      part_ml = reinterpret_cast<float2*>(partials.mutable_data_ptr<float>());
      part_out = partials.mutable_data_ptr<float>() + 2 * B * Hq * nsplit;
    }
    kernel<<<static_cast<unsigned>(blocks), kThreads, layout.smem, stream>>>(
        query.mutable_data_ptr<scalar_t>(), key_cache.mutable_data_ptr<scalar_t>(),
        value_cache.mutable_data_ptr<scalar_t>(), lengths.mutable_data_ptr<int32_t>(), out.mutable_data_ptr<scalar_t>(),
        part_ml, part_out, scratch.mutable_data_ptr<int32_t>(), p);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
    if (nsplit > 1) {
      decode::decode_merge_kernel<scalar_t><<<static_cast<unsigned>(B * Hq), decode::kMergeThreads, 0, stream>>>(
          part_ml, part_out, out.mutable_data_ptr<scalar_t>(), static_cast<int>(nsplit), D);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    }
    cuda::check_status("decode_attention", scratch);
  });
  return out;
}

ATTNGATE_IMPL(CUDA, decode_attention, decode_attention_cuda);

}  // namespace attngate
