// The CUDA decode attention of both cache layouts (csrc/kv_tables.h): paged_decode_attention, the attention of
// paged_decode_step_ and, on a rectangle cache, decode_attention (cuda/decode_attention.cu). One query token per
// (batch, query head) over its KV head's rows plus optional extra rows. Three launches, no host synchronisation:
//   decode_plan_kernel   (cuda/decode_plan.cuh)  splits every head tile's rows into work items from its real length
//   decode_tiled_kernel  (cuda/decode_tiled.cuh) the fast path: GQA tiles sharing every K/V row, cp.async staging
//     or decode_wide_kernel (cuda/decode_wide.cuh) rows the tiled kernel cannot map or stage (see pick_layout)
//   decode_merge_kernel  (cuda/decode_plan.cuh)  combines the items of the heads that were split
// The decode kernel runs a persistent grid of exactly the device's resident blocks (the occupancy query is cached
// per kernel and device), so there is no partial last wave, and a block takes items until none is left.
#include <algorithm>
#include <cstdint>
#include <limits>

#include "checks.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/decode_plan.cuh"
#include "cuda/decode_rows.cuh"
#include "cuda/decode_tiled.cuh"
#include "cuda/decode_wide.cuh"
#include "cuda/launch_cache.cuh"
#include "cuda/paged_attention_kernels.cuh"
#include "cuda/stable_cuda.cuh"
#include "dispatch.h"
#include "paged_attention_checks.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

using decode::DecodeParams;

template <typename scalar_t>
using DecodeKernel = void (*)(const scalar_t*, const scalar_t*, const scalar_t*, const scalar_t*, const scalar_t*,
                              const bool*, scalar_t*, float2*, float*, decode::Plan, int32_t*, DecodeParams);

// How one call runs: which kernel, its shared memory and the offsets inside it.
struct Layout {
  bool wide = false;
  int gt = 1;               // query heads per tile: 1, 4 or 8 (tiled kernel)
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
  const int64_t tile_rows = (decode::kThreads / decode::kLanesPerRow) * l.rows_per_thread;
  const int64_t nvec = vec ? D / (16 / elem) : D;
  const int64_t groups_v = l.gt / decode::value_heads(l.gt, vec ? static_cast<int>(16 / elem) : 1);
  const int64_t pitch_bytes = row_bytes + 16;  // one 16-byte pad per staged row: at most 2-way bank conflicts
  const int64_t q_bytes = round16(l.gt * D * 4), w_bytes = round16(l.gt * tile_rows * 4);
  const int64_t k_bytes = vec ? round16(std::max(tile_rows * pitch_bytes, l.gt * D * 4)) : 0;
  const int64_t v_bytes = vec ? round16(tile_rows * pitch_bytes) : 0;
  const int64_t red_bytes = vec ? 0 : q_bytes;  // the vector path reduces into the key staging buffer
  const int64_t smem = q_bytes + w_bytes + k_bytes + v_bytes + red_bytes;
  // 8 KiB of margin for the kernel's static shared memory (row addresses, softmax state) and the reservation.
  l.wide = nvec * groups_v > decode::kThreads || smem + 8 * 1024 > smem_optin;
  if (l.wide) return l;
  p.w_off = static_cast<int>(q_bytes);
  p.k_off = static_cast<int>(q_bytes + w_bytes);
  p.v_off = static_cast<int>(q_bytes + w_bytes + k_bytes);
  p.red_off = vec ? p.k_off : static_cast<int>(q_bytes + w_bytes + k_bytes + v_bytes);
  p.pitch = static_cast<int>(pitch_bytes / elem);
  p.nvec = static_cast<int>(nvec);
  p.tile_rows = tile_rows;
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

template <typename T>
const T* data_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

}  // namespace

void launch_decode_attention(const Tensor& query, const paged::Tables& t, const Tensor& key_pages,
                             const Tensor& value_pages, const paged::Pool& key_pool, const paged::Pool& value_pool,
                             double scale, double softcap, const std::optional<Tensor>& extra_key,
                             const std::optional<Tensor>& extra_value, const std::optional<Tensor>& extra_valid,
                             Tensor& out, int32_t* status) {
  if (out.numel() == 0) return;
  const int64_t B = t.B, H = t.H, BH = B * H, D = key_pages.size(-1), Hq = query.size(1), group = Hq / H;
  const int64_t E = extra_key.has_value() ? extra_key->size(2) : 0;
  const cudaStream_t stream = cuda::current_stream();
  const cuda::DeviceFacts* props = &cuda::device_facts();
  const int64_t elem = static_cast<int64_t>(key_pages.element_size());
  // The tiled kernel reads the query as scalars; the wide kernel reads it with the rows' vector width too.
  const bool vec_kv = rows_aligned_for(16, {&key_pages, &value_pages}) &&
                      (E == 0 || rows_aligned_for(16, {&*extra_key, &*extra_value}));

  DecodeParams p{};
  p.t = t;
  p.kp = key_pool;
  p.vp = value_pool;
  p.q_b = query.stride(0), p.q_h = query.stride(1);
  if (E > 0) {
    p.ek_b = extra_key->stride(0), p.ek_h = extra_key->stride(1), p.ek_e = extra_key->stride(2);
    p.ev_b = extra_value->stride(0), p.ev_h = extra_value->stride(1), p.ev_e = extra_value->stride(2);
    if (extra_valid.has_value()) {
      p.evd_b = extra_valid->stride(0), p.evd_h = extra_valid->stride(1), p.evd_e = extra_valid->stride(2);
    }
  }
  p.E = E, p.Hq = Hq, p.group = group;
  AG_CHECK(D <= std::numeric_limits<int32_t>::max(), "decode attention: head dim D = ", D, " is too large");
  p.D = static_cast<int>(D);
  p.scale = static_cast<float>(scale) * decode::kLog2e;
  p.cap = static_cast<float>(softcap) * decode::kLog2e;
  const Layout layout = pick_layout(p, group, D, elem, vec_kv, static_cast<int64_t>(props->sharedMemPerBlockOptin));
  const bool vec = layout.wide ? vec_kv && rows_aligned_for(16, {&query}) : vec_kv;
  if (layout.wide) {
    p.ncol = static_cast<int>(cuda::ceil_div(D, decode::kWideThreads * (vec ? 16 / elem : 1)));
    p.tile_rows = decode::kWideRows;
  }
  p.ntiles = layout.wide ? group : cuda::ceil_div(group, layout.gt);
  const int gt_stride = layout.wide ? 1 : layout.gt;  // partials per item
  const int64_t head_tiles = BH * p.ntiles;
  AG_CHECK(head_tiles < std::numeric_limits<int32_t>::max() / 2, "decode attention: too many heads: ", head_tiles);

  ATTNGATE_DISPATCH_FLOATING_TYPES(query.scalar_type(), "decode_attention_cuda", [&] {
    const DecodeKernel<scalar_t> kernel = pick_kernel<scalar_t>(layout, vec);
    const int threads = layout.wide ? decode::kWideThreads : decode::kThreads;
    cuda::ensure_dynamic_smem(reinterpret_cast<const void*>(kernel), layout.smem);
    const int per_sm = cuda::blocks_per_sm(reinterpret_cast<const void*>(kernel), threads, layout.smem);
    const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * props->multiProcessorCount;
    const int64_t grid_x = layout.wide ? std::max<int64_t>(1, resident / p.ncol) : resident;
    const int64_t max_items = decode::kWaves * grid_x + head_tiles;  // the plan never lists more

    // Scratch: the plan (int32 words), then the partials: (max, sum) pairs first, so that they stay 8-byte aligned.
    const Tensor plan_words = empty_like_device({decode::plan_words(head_tiles)}, kInt, query);
    const decode::Plan plan = decode::carve_plan(plan_words.mutable_data_ptr<int32_t>());
    const Tensor partials = empty_like_device({max_items * gt_stride * (2 + D)}, kFloat, query);
    float2* part_ml = reinterpret_cast<float2*>(partials.mutable_data_ptr<float>());
    float* part_out = partials.mutable_data_ptr<float>() + 2 * max_items * gt_stride;

    decode::decode_plan_kernel<<<1, decode::kPlanThreads, 0, stream>>>(t, E, p.ntiles, grid_x, p.tile_rows, plan,
                                                                       status);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>(grid_x), layout.wide ? static_cast<unsigned>(p.ncol) : 1u);
    kernel<<<grid, threads, layout.smem, stream>>>(
        query.const_data_ptr<scalar_t>(), key_pages.const_data_ptr<scalar_t>(),
        value_pages.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(extra_key), data_or_null<scalar_t>(extra_value),
        E > 0 ? data_or_null<bool>(extra_valid) : nullptr, out.mutable_data_ptr<scalar_t>(), part_ml, part_out, plan,
        status, p);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
    decode::decode_merge_kernel<scalar_t><<<static_cast<unsigned>(B * Hq), decode::kMergeThreads, 0, stream>>>(
        part_ml, part_out, out.mutable_data_ptr<scalar_t>(), plan.prefix, Hq, H, group, p.ntiles, gt_stride, D);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_paged_decode_attention(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                   const Tensor& page_table, const Tensor& lengths, double scale, double softcap,
                                   const std::optional<Tensor>& extra_key, const std::optional<Tensor>& extra_value,
                                   const std::optional<Tensor>& extra_valid, Tensor& out, int32_t* status) {
  launch_decode_attention(query, paged::make_read_tables(key_pages, page_table, lengths), key_pages, value_pages,
                          paged::make_pool(key_pages), paged::make_pool(value_pages), scale, softcap, extra_key,
                          extra_value, extra_valid, out, status);
}

namespace {

Tensor paged_decode_attention_cuda(const Tensor& query, const Tensor& key_pages, const Tensor& value_pages,
                                   const Tensor& page_table, const Tensor& lengths, double scale,
                                   const std::optional<Tensor>& extra_key, const std::optional<Tensor>& extra_value,
                                   const std::optional<Tensor>& extra_valid, double softcap) {
  check_paged_decode_attention_args(query, key_pages, value_pages, page_table, lengths, scale, extra_key, extra_value,
                                    extra_valid, softcap);
  const cuda::DeviceGuard device_guard(query);
  Tensor out = empty_like_device(query.sizes(), query.scalar_type(), query);
  const Tensor scratch = cuda::make_status_scratch(key_pages, 0, 1);
  launch_paged_decode_attention(query, key_pages, value_pages, page_table, lengths, scale, softcap, extra_key,
                                extra_value, extra_valid, out, scratch.mutable_data_ptr<int32_t>());
  cuda::check_status("paged_decode_attention", scratch);
  return out;
}

}  // namespace

ATTNGATE_IMPL(CUDA, paged_decode_attention, paged_decode_attention_cuda);

}  // namespace attngate
