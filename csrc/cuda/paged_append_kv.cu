// paged_append_kv_: writes the kept rows of key/value (B, H, T, D) after each head's rows in its pages, popping
// new pages from the free stack on the device (semantics: attngate_ext/ops/paged_reference.py).
//
// Decode (T <= 32, B * H * T <= kFusedMaxRows): ONE launch, append_fused_kernel. One block plans (keep flags of a
// head as a warp ballot, block scan of the page needs, validation of every head, page pops) and then copies the
// rows with all its threads: a decode step costs a single small kernel and stays CUDA-graph capturable.
//
// Larger appends (prefill): three launches so that the copy spreads over the whole GPU:
//   1. count_kept_kernel    kept rows of every (head, chunk of kChunk rows)      (skipped when keep is None)
//   2. append_plan_kernel   one block: chunk prefixes, validation, page pops, lengths, free_count
//   3. append_rows_kernel   one block per (head, chunk): block scan of the flags, 16-byte row copies
// Every kernel after the plan tests the status word first: on any value error nothing is written.
#include <algorithm>
#include <limits>

#include "checks.h"
#include "cuda/stable_cuda.cuh"
#include "cuda_utils.cuh"
#include "dispatch.h"
#include "paged_append.h"
#include "paged_storage_checks.h"
#include "paged_storage_cuda.cuh"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

namespace pg = cuda::paged;

constexpr int kPlanThreads = 512;
constexpr int kChunk = 256;  // rows of T per copy block; one flag per thread
constexpr int kThreads = kChunk;
constexpr int64_t kFusedMaxT = 32;         // a head's flags fit one warp ballot
constexpr int64_t kFusedMaxRows = 1024;    // B * H * T rows copied by the single block
constexpr int64_t kFusedMaxHeads = kFusedMaxRows;

struct AppendParams {
  int64_t T, nchunks;
  pg::PoolStrides kp, vp;       // key_pages / value_pages (page, slot) strides
  int64_t k_sb, k_sh, k_st;     // key strides
  int64_t v_sb, v_sh, v_st;     // value strides
  int64_t keep_sb, keep_sh, keep_st;
  int units_per_row;            // D / vector width
};

// Copies unit u of new row t of head (b, h) onto (page, slot) of the pools.
template <typename scalar_t, int kVec>
__device__ __forceinline__ void copy_new_unit(scalar_t* __restrict__ key_pages, scalar_t* __restrict__ value_pages,
                                              const scalar_t* __restrict__ key, const scalar_t* __restrict__ value,
                                              const AppendParams& p, int64_t b, int64_t h, int64_t t, int64_t page,
                                              int64_t slot, int u) {
  const int64_t col = static_cast<int64_t>(u) * kVec;
  cuda::copy_elems<scalar_t, kVec>(key_pages + p.kp.at(page, slot) + col,
                                   key + b * p.k_sb + h * p.k_sh + t * p.k_st + col);
  cuda::copy_elems<scalar_t, kVec>(value_pages + p.vp.at(page, slot) + col,
                                   value + b * p.v_sb + h * p.v_sh + t * p.v_st + col);
}

template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kPlanThreads) append_fused_kernel(
    scalar_t* __restrict__ key_pages,    // (P, S, D)
    scalar_t* __restrict__ value_pages,  // (P, S, D)
    const pg::Tables t,                  // page_table (B, H, M), lengths (B, H), free stack (P), (1)
    const scalar_t* __restrict__ key,    // (B, H, T, D)
    const scalar_t* __restrict__ value,  // (B, H, T, D)
    const bool* __restrict__ keep,       // (B, H, T) or null (every row kept)
    const pg::HeadScratch s,             // [B * H] each
    int32_t* __restrict__ status,        // (1); with `gated`, already set by the caller's earlier kernels
    const int64_t BH, const AppendParams p, const bool gated) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  __shared__ uint32_t kept_mask[kFusedMaxHeads];  // bit i: row i of the head is kept
  const int64_t T = p.T;
  auto kept = [&](int64_t bh, int lane) -> int64_t {
    const int64_t b = bh / t.H, h = bh % t.H;
    const bool flag = lane < T && (keep == nullptr || keep[b * p.keep_sb + h * p.keep_sh + lane * p.keep_st]);
    const uint32_t mask = __ballot_sync(cuda::kFullMask, flag);
    if (lane == 0) kept_mask[bh] = mask;
    return __popc(mask);
  };
  if (!pg::plan_take<kPlanThreads>(t, BH, kept, s, status, gated)) return;
  __syncthreads();  // the pages just popped into the table and kept_mask are visible to the whole block

  const int units = p.units_per_row;
  const int64_t per_head = T * units;
  for (int64_t i = threadIdx.x; i < BH * per_head; i += kPlanThreads) {
    const int64_t bh = i / per_head, rem = i - bh * per_head;
    const int64_t row = rem / units;
    const uint32_t mask = kept_mask[bh];
    if (!((mask >> row) & 1u)) continue;
    const int64_t dst = s.old_len[bh] + __popc(mask & ((1u << row) - 1u));
    const int64_t page = *t.entry(bh, dst / t.S);
    copy_new_unit<scalar_t, kVec>(key_pages, value_pages, key, value, p, bh / t.H, bh % t.H, row, page, dst % t.S,
                                  static_cast<int>(rem - row * units));
  }
}

template <int kThreadsPlan>
__global__ void __launch_bounds__(kThreadsPlan) append_plan_kernel(
    const pg::Tables t,
    int32_t* __restrict__ counts,  // (B * H, nchunks) kept rows per chunk in, exclusive prefixes out; null: all kept
    const pg::HeadScratch s, int32_t* __restrict__ status, const int64_t BH, const int64_t nchunks, const int64_t T,
    const bool gated) {
  auto kept = [&](int64_t bh, int lane) -> int64_t {
    return counts == nullptr ? T : pg::warp_exclusive_prefix(counts + bh * nchunks, nchunks, lane);
  };
  pg::plan_take<kThreadsPlan>(t, BH, kept, s, status, gated);
}

template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads) append_rows_kernel(
    scalar_t* __restrict__ key_pages,     // (P, S, D)
    scalar_t* __restrict__ value_pages,   // (P, S, D)
    const pg::Tables t,                   // the page table already holds the popped pages
    const scalar_t* __restrict__ key,     // (B, H, T, D)
    const scalar_t* __restrict__ value,   // (B, H, T, D)
    const bool* __restrict__ keep,        // (B, H, T) or null (every row kept)
    const int32_t* __restrict__ offsets,  // (B * H, nchunks) kept rows before each chunk; null when keep is null
    const int32_t* __restrict__ old_len,  // (B * H) lengths before the append
    const int32_t* __restrict__ status,   // (1) written by the plan
    const AppendParams p) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  __shared__ int warp_counts[kThreads / 32];
  __shared__ int src_rows[kChunk];
  __shared__ int32_t dst_page[kChunk];  // page ids < P < 2^31
  __shared__ int dst_slot[kChunk];
  if (*status != 0) return;  // some head failed validation: nothing may be written anywhere

  const int64_t item = blockIdx.x;  // = bh * nchunks + chunk
  const int64_t bh = item / p.nchunks, chunk = item % p.nchunks;
  const int64_t b = bh / t.H, h = bh % t.H;
  const int64_t t0 = chunk * kChunk;
  const int64_t row = t0 + threadIdx.x;
  const bool flag = row < p.T && (keep == nullptr || keep[b * p.keep_sb + h * p.keep_sh + row * p.keep_st]);
  int n = 0;
  const int pos = cuda::block_exclusive_count<kThreads>(flag, warp_counts, n);
  if (flag) {
    // With keep == null every row is kept, so the chunk's first destination is simply its first row.
    const int64_t dst = old_len[bh] + (offsets != nullptr ? offsets[item] : t0) + pos;
    src_rows[pos] = static_cast<int>(threadIdx.x);
    dst_page[pos] = *t.entry(bh, dst / t.S);
    dst_slot[pos] = static_cast<int>(dst % t.S);
  }
  __syncthreads();
  const int units = p.units_per_row;
  for (int i = threadIdx.x; i < n * units; i += kThreads) {
    const int r = i / units;
    copy_new_unit<scalar_t, kVec>(key_pages, value_pages, key, value, p, b, h, t0 + src_rows[r], dst_page[r],
                                  dst_slot[r], i - r * units);
  }
}

// The launches of one append. `status` is the caller's status word; with `gated` it may already be set (then
// nothing is written), without it the plan writes it whatever it held.
void enqueue_append(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths, Tensor& free_pages,
                    Tensor& free_count, const Tensor& key, const Tensor& value, const std::optional<Tensor>& keep,
                    int32_t* status, bool gated) {
  const int64_t BH = page_table.size(0) * page_table.size(1), T = key.size(2), D = key_pages.size(2);
  const cudaStream_t stream = cuda::current_stream();
  const pg::Tables t = pg::make_tables(key_pages, page_table, lengths, free_pages, free_count);
  const bool has_keep = keep.has_value();
  const bool fused = T <= kFusedMaxT && BH * T <= kFusedMaxRows && BH <= kFusedMaxHeads;
  const int64_t nchunks = fused ? 0 : cuda::ceil_div(T, kChunk);
  AG_CHECK(BH * nchunks <= std::numeric_limits<int32_t>::max(), "paged_append_kv_: B * H * ceil(T / ", kChunk,
           ") must fit in a CUDA grid, got ", BH * nchunks);

  // Scratch: [old_len, new_len, count, before: BH each][chunk offsets: BH * nchunks when keep is given]. The plan
  // writes every word that it or the copy kernel reads, so nothing needs zeroing.
  const int64_t offset_words = has_keep ? BH * nchunks : 0;
  const Tensor scratch = empty_like_device({std::max<int64_t>(4 * BH + offset_words, 1)}, kInt, key_pages);
  int32_t* words = scratch.mutable_data_ptr<int32_t>();
  const pg::HeadScratch heads = pg::carve_heads(words, BH);
  int32_t* offsets = has_keep && nchunks > 0 ? words + 4 * BH : nullptr;

  AppendParams p;
  p.T = T;
  p.nchunks = nchunks;
  p.kp = {key_pages.stride(0), key_pages.stride(1)};
  p.vp = {value_pages.stride(0), value_pages.stride(1)};
  p.k_sb = key.stride(0), p.k_sh = key.stride(1), p.k_st = key.stride(2);
  p.v_sb = value.stride(0), p.v_sh = value.stride(1), p.v_st = value.stride(2);
  p.keep_sb = has_keep ? keep->stride(0) : 0, p.keep_sh = has_keep ? keep->stride(1) : 0;
  p.keep_st = has_keep ? keep->stride(2) : 0;
  const bool* keep_ptr = has_keep ? keep->const_data_ptr<bool>() : nullptr;
  const bool vec = D > 0 && rows_aligned_for(16, {&key_pages, &value_pages, &key, &value});

  ATTNGATE_DISPATCH_FLOATING_TYPES(key_pages.scalar_type(), "paged_append_kv_cuda", [&] {
    const int64_t vec_width = vec ? 16 / static_cast<int64_t>(sizeof(scalar_t)) : 1;
    AG_CHECK(D / vec_width * kChunk <= std::numeric_limits<int32_t>::max(), "paged_append_kv_: head dim D = ", D,
             " is too large");
    p.units_per_row = static_cast<int>(D / vec_width);
    if (fused) {
      auto kernel = vec ? append_fused_kernel<scalar_t, true> : append_fused_kernel<scalar_t, false>;
      kernel<<<1, kPlanThreads, 0, stream>>>(
          key_pages.mutable_data_ptr<scalar_t>(), value_pages.mutable_data_ptr<scalar_t>(), t,
          key.mutable_data_ptr<scalar_t>(), value.mutable_data_ptr<scalar_t>(), keep_ptr, heads, status, BH, p,
          gated);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    if (offsets != nullptr && BH > 0) {  // B * H = 0 would be an empty grid, a launch error
      cuda::count_kept_kernel<kThreads><<<static_cast<unsigned>(BH * nchunks), kThreads, 0, stream>>>(
          keep_ptr, nullptr, offsets, t.H, p.keep_sb, p.keep_sh, p.keep_st, 0, 0, nchunks, kChunk, T);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    }
    append_plan_kernel<kPlanThreads><<<1, kPlanThreads, 0, stream>>>(t, offsets, heads, status, BH, nchunks, T,
                                                                     gated);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
    if (BH * nchunks > 0 && D > 0) {
      auto kernel = vec ? append_rows_kernel<scalar_t, true> : append_rows_kernel<scalar_t, false>;
      kernel<<<static_cast<unsigned>(BH * nchunks), kThreads, 0, stream>>>(
          key_pages.mutable_data_ptr<scalar_t>(), value_pages.mutable_data_ptr<scalar_t>(), t,
          key.mutable_data_ptr<scalar_t>(), value.mutable_data_ptr<scalar_t>(), keep_ptr, offsets, heads.old_len,
          status, p);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace

void enqueue_paged_append_kv_cuda(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                                  Tensor& free_pages, Tensor& free_count, const Tensor& key, const Tensor& value,
                                  const std::optional<Tensor>& keep, int32_t* status) {
  enqueue_append(key_pages, value_pages, page_table, lengths, free_pages, free_count, key, value, keep, status,
                 /*gated=*/true);
}

namespace {

void paged_append_kv_cuda(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                          Tensor& free_pages, Tensor& free_count, const Tensor& key, const Tensor& value,
                          const std::optional<Tensor>& keep) {
  check_paged_append_args(key_pages, value_pages, page_table, lengths, free_pages, free_count, key, value, keep);
  const cuda::DeviceGuard device_guard(key_pages);
  const Tensor scratch = cuda::make_status_scratch(key_pages, 0, 0);  // the plan always writes the status word
  enqueue_append(key_pages, value_pages, page_table, lengths, free_pages, free_count, key, value, keep,
                 scratch.mutable_data_ptr<int32_t>(), /*gated=*/false);
  cuda::check_status("paged_append_kv_", scratch);
}

}  // namespace

ATTNGATE_IMPL(CUDA, paged_append_kv_, paged_append_kv_cuda);

}  // namespace attngate
