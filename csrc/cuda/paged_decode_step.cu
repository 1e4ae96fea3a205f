// CUDA entry point of attngate::paged_decode_step_: one decode step of a gated layer in one call, on one status
// word, in this order:
//   1. validate_state_kernel   every length and every page id the step reads (the CPU op's check before writing)
//   2. the paged_append_kv_ kernels: the new token (or, with ring_keep, the kept row leaving the ring slot) to the
//      pages of the heads that keep it; they write nothing when step 1 set the status
//   3. write_ring_slot_kernel  the new token and its flags into the ring slot, only when the status is still 0
//   4. the paged decode attention kernels over the pages and the valid ring rows
// So a failing step writes nothing (pages, lengths, free stack, ring), also with sync checks off and inside a CUDA
// graph, where nobody is told at once. The one host synchronisation is the optional status read-back at the end.

#include <algorithm>
#include <limits>

#include "checks.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/paged_attention_kernels.cuh"
#include "cuda/stable_cuda.cuh"
#include "cuda/storage_kernels.cuh"
#include "dispatch.h"
#include "kv_tables.h"
#include "paged_step.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

constexpr int kThreads = 256;

// One warp per head: the head's length lies in [0, M * S] and the ids of its ceil(length / S) pages in [0, P).
__global__ void __launch_bounds__(kThreads) validate_state_kernel(
    const int32_t* __restrict__ page_table,  // (B, H, M)
    const int32_t* __restrict__ lengths,     // (B, H)
    int32_t* __restrict__ status,            // (1) zeroed
    int64_t BH, int64_t H, int64_t t_sb, int64_t t_sh, int64_t t_sm, int64_t l_sb, int64_t l_sh, int64_t M,
    int64_t S, int64_t P) {
  const int lane = threadIdx.x & 31;
  const int64_t bh = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  if (bh >= BH) return;
  const int64_t b = bh / H, h = bh - b * H;
  const int64_t n = lengths[b * l_sb + h * l_sh];
  if (n < 0 || n > M * S) {
    if (lane == 0) atomicOr(status, kStatusLengthOutOfRange);
    return;
  }
  const int32_t* row = page_table + b * t_sb + h * t_sh;
  bool bad = false;
  for (int64_t i = lane; i < paged::pages_for(n, S); i += 32) {
    const int64_t id = row[i * t_sm];
    bad |= id < 0 || id >= P;
  }
  if (__any_sync(cuda::kFullMask, bad) && lane == 0) atomicOr(status, kStatusBadPageId);
}

struct RingParams {
  int64_t k_sb, k_sh, v_sb, v_sh;                  // key / value (B, H, D)
  int64_t rk_sb, rk_sh, rk_sw, rv_sb, rv_sh, rv_sw;  // ring_key / ring_value (B, H, W, D)
  int64_t rvd_sb, rvd_sh, rvd_sw;                  // ring_valid (B, H, W)
  int64_t rkp_sb, rkp_sh, rkp_sw;                  // ring_keep (B, H, W), when given
  int64_t keep_sb, keep_sh, valid_s;               // keep (B, H), valid (B,)
  int64_t H, slot, D;
  int units;                                       // D / vector width, at least 1 (the flags)
};

// Writes key/value (B, H, D) into ring slot `slot` and the slot's flags: with ring_keep, visible = the row is valid
// and ring_keep = valid and kept (the token waits in the ring); without, visible = valid and not kept (a kept token
// went to the pages). Does nothing when *status != 0.
template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads) write_ring_slot_kernel(
    scalar_t* __restrict__ ring_key, scalar_t* __restrict__ ring_value, bool* __restrict__ ring_valid,
    bool* __restrict__ ring_keep,  // or null
    const scalar_t* __restrict__ key, const scalar_t* __restrict__ value, const bool* __restrict__ keep,
    const bool* __restrict__ valid,  // or null (every row valid)
    const int32_t* __restrict__ status, int64_t BH, const RingParams p) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  if (*status != 0) return;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= BH * p.units) return;
  const int64_t bh = i / p.units, b = bh / p.H, h = bh - b * p.H;
  const int64_t col = (i - bh * p.units) * kVec;
  if (col < p.D) {
    cuda::copy_elems<scalar_t, kVec>(ring_key + b * p.rk_sb + h * p.rk_sh + p.slot * p.rk_sw + col,
                                     key + b * p.k_sb + h * p.k_sh + col);
    cuda::copy_elems<scalar_t, kVec>(ring_value + b * p.rv_sb + h * p.rv_sh + p.slot * p.rv_sw + col,
                                     value + b * p.v_sb + h * p.v_sh + col);
  }
  if (col != 0) return;
  const bool row_valid = valid == nullptr || valid[b * p.valid_s];
  const bool kept = keep[b * p.keep_sb + h * p.keep_sh];
  if (ring_keep != nullptr) {
    ring_valid[b * p.rvd_sb + h * p.rvd_sh + p.slot * p.rvd_sw] = row_valid;
    ring_keep[b * p.rkp_sb + h * p.rkp_sh + p.slot * p.rkp_sw] = row_valid && kept;
  } else {
    ring_valid[b * p.rvd_sb + h * p.rvd_sh + p.slot * p.rvd_sw] = row_valid && !kept;
  }
}

void launch_validate_state(const Tensor& key_pages, const Tensor& page_table, const Tensor& lengths,
                           int32_t* status, cudaStream_t stream) {
  const int64_t B = page_table.size(0), H = page_table.size(1), BH = B * H;
  if (BH == 0) return;
  const int64_t blocks = cuda::ceil_div(BH * 32, kThreads);
  AG_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "paged_decode_step_: too many heads: ", BH);
  validate_state_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      page_table.const_data_ptr<int32_t>(), lengths.const_data_ptr<int32_t>(), status, BH, H, page_table.stride(0),
      page_table.stride(1), page_table.stride(2), lengths.stride(0), lengths.stride(1), page_table.size(2),
      key_pages.size(1), key_pages.size(0));
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_write_ring_slot(Tensor& ring_key, Tensor& ring_value, Tensor& ring_valid,
                            const std::optional<Tensor>& ring_keep, const Tensor& key, const Tensor& value,
                            const Tensor& keep, const std::optional<Tensor>& valid, int64_t slot,
                            const int32_t* status, cudaStream_t stream) {
  const int64_t B = key.size(0), H = key.size(1), D = key.size(2), BH = B * H;
  if (BH == 0) return;
  const bool vec = D > 0 && rows_aligned_for(16, {&ring_key, &ring_value, &key, &value});
  RingParams p;
  p.k_sb = key.stride(0), p.k_sh = key.stride(1), p.v_sb = value.stride(0), p.v_sh = value.stride(1);
  p.rk_sb = ring_key.stride(0), p.rk_sh = ring_key.stride(1), p.rk_sw = ring_key.stride(2);
  p.rv_sb = ring_value.stride(0), p.rv_sh = ring_value.stride(1), p.rv_sw = ring_value.stride(2);
  p.rvd_sb = ring_valid.stride(0), p.rvd_sh = ring_valid.stride(1), p.rvd_sw = ring_valid.stride(2);
  p.rkp_sb = p.rkp_sh = p.rkp_sw = 0;
  if (ring_keep.has_value()) {
    p.rkp_sb = ring_keep->stride(0), p.rkp_sh = ring_keep->stride(1), p.rkp_sw = ring_keep->stride(2);
  }
  p.keep_sb = keep.stride(0), p.keep_sh = keep.stride(1);
  p.valid_s = valid.has_value() ? valid->stride(0) : 0;
  p.H = H, p.slot = slot, p.D = D;
  ATTNGATE_DISPATCH_FLOATING_TYPES(key.scalar_type(), "paged_decode_step_cuda", [&] {
    // D = 0: one unit per head still writes its flags (and copies nothing: col < D fails).
    const int64_t units = std::max<int64_t>(vec ? D / cuda::vec_elems<scalar_t, true>() : D, 1);
    AG_CHECK(BH * units <= std::numeric_limits<int32_t>::max() * static_cast<int64_t>(kThreads),
             "paged_decode_step_: B * H * D is too large");
    p.units = static_cast<int>(units);
    auto kernel = vec ? write_ring_slot_kernel<scalar_t, true> : write_ring_slot_kernel<scalar_t, false>;
    kernel<<<static_cast<unsigned>(cuda::ceil_div(BH * units, kThreads)), kThreads, 0, stream>>>(
        ring_key.mutable_data_ptr<scalar_t>(), ring_value.mutable_data_ptr<scalar_t>(),
        ring_valid.mutable_data_ptr<bool>(), ring_keep.has_value() ? ring_keep->mutable_data_ptr<bool>() : nullptr,
        key.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(), keep.const_data_ptr<bool>(),
        valid.has_value() ? valid->const_data_ptr<bool>() : nullptr, status, BH, p);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Tensor paged_decode_step_cuda(const Tensor& query, Tensor& key_pages, Tensor& value_pages, Tensor& page_table,
                              Tensor& lengths, Tensor& free_pages, Tensor& free_count, const Tensor& key,
                              const Tensor& value, const Tensor& keep, const std::optional<Tensor>& valid,
                              Tensor& ring_key, Tensor& ring_value, Tensor& ring_valid, int64_t slot, double scale,
                              const std::optional<Tensor>& ring_keep, double softcap) {
  check_paged_decode_step_args(query, key_pages, value_pages, page_table, lengths, free_pages, free_count, key, value,
                               keep, valid, ring_key, ring_value, ring_valid, slot, scale, ring_keep, softcap);
  const cuda::DeviceGuard device_guard(query);
  const cudaStream_t stream = cuda::current_stream();
  const Tensor scratch = cuda::make_status_scratch(key_pages, 0, 1);
  int32_t* status = scratch.mutable_data_ptr<int32_t>();
  launch_validate_state(key_pages, page_table, lengths, status, stream);
  auto append = [&](Tensor& kp, Tensor& vp, Tensor& table, Tensor& lens, Tensor& fp, Tensor& fc, const Tensor& k,
                    const Tensor& v, const std::optional<Tensor>& flags) {
    enqueue_paged_append_kv_cuda(kp, vp, table, lens, fp, fc, k, v, flags, status);
  };
  append_step_rows(append, key_pages, value_pages, page_table, lengths, free_pages, free_count, key, value, keep,
                   ring_key, ring_value, ring_keep, slot);
  launch_write_ring_slot(ring_key, ring_value, ring_valid, ring_keep, key, value, keep, valid, slot, status, stream);
  Tensor out = empty_like_device(query.sizes(), query.scalar_type(), query);
  launch_paged_decode_attention(query, key_pages, value_pages, page_table, lengths, scale, softcap, ring_key, ring_value,
                                ring_valid, out, status);
  cuda::check_status("paged_decode_step_", scratch);
  return out;
}

}  // namespace

ATTNGATE_IMPL(CUDA, paged_decode_step_, paged_decode_step_cuda);

}  // namespace attngate
