// The CUDA append kernel of both cache layouts (csrc/kv_tables.h): paged_append_kv_ and, on a rectangle cache,
// append_kv_ (cuda/append_kv.cu). Writes the kept rows of key/value (B, H, T, D) after each head's rows, popping
// new pages from the free stack of a paged cache (semantics: attngate_ext/ops/paged_reference.py).
//
// Decode (T <= 32, B * H * T <= kFusedMaxRows): ONE launch, append_fused_kernel. One block plans (one thread per
// head: its keep flags as a bit mask, validation, page needs; block scan; page pops) and then copies the rows
// with all its threads: a decode step costs a single small kernel and stays CUDA-graph capturable.
//
// Larger appends (prefill): three launches so that the copy spreads over the whole GPU:
//   1. count_kept_kernel    kept rows of every (head, chunk of kChunk rows)      (skipped when keep is None)
//   2. append_plan_kernel   one block: chunk prefixes, validation, page pops, lengths, free_count
//   3. append_rows_kernel   one block per (head, chunk): block scan of the flags, 16-byte row copies
// Every kernel after the plan tests the status word first: on any value error nothing is written. Row addresses
// are computed once per row (a page lookup and two divisions), never per copied 16-byte unit.
#include <algorithm>
#include <limits>

#include "checks.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/paged_storage.cuh"
#include "cuda/stable_cuda.cuh"
#include "cuda/storage_kernels.cuh"
#include "dispatch.h"
#include "paged_storage_checks.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

namespace pg = cuda::paged;

constexpr int kPlanThreads = 512;
constexpr int kChunk = 256;  // rows of T per copy block; one flag per thread
constexpr int kThreads = kChunk;
constexpr int64_t kFusedMaxT = 32;       // a head's flags fit one 32-bit mask
constexpr int64_t kFusedMaxRows = 1024;  // B * H * T rows copied by the single block
constexpr int64_t kFusedMaxHeads = kFusedMaxRows;

struct AppendParams {
  int64_t T, nchunks;
  pg::Pool kp, vp;            // where the cache's rows are
  int64_t k_sb, k_sh, k_st;   // key strides
  int64_t v_sb, v_sh, v_st;   // value strides
  int64_t keep_sb, keep_sh, keep_st;
  int units_per_row;          // D / vector width
};

template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kPlanThreads) append_fused_kernel(
    scalar_t* __restrict__ key_pages,    // the pools (P, S, D) or the rectangle (B, H, C, D)
    scalar_t* __restrict__ value_pages,
    const pg::Tables t,                  // lengths (B, H), page table (B, H, M) and free stack, or a rectangle's
    const scalar_t* __restrict__ key,    // (B, H, T, D)
    const scalar_t* __restrict__ value,  // (B, H, T, D)
    const bool* __restrict__ keep,       // (B, H, T) or null (every row kept)
    const pg::HeadScratch s,             // [B * H] each
    int32_t* __restrict__ status,        // (1); with `gated`, already set by the caller's earlier kernels
    const int64_t BH, const AppendParams p, const bool gated) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  __shared__ uint32_t kept_mask[kFusedMaxHeads];  // bit i: row i of the head is kept
  // Element offsets of every new row's destination (-1: not kept) and source: 32 KiB.
  __shared__ int64_t dst_k[kFusedMaxRows], dst_v[kFusedMaxRows], src_k[kFusedMaxRows], src_v[kFusedMaxRows];
  const int T = static_cast<int>(p.T), H = static_cast<int>(t.H);
  auto kept = [&](int64_t bh) -> int64_t {
    const int b = static_cast<int>(bh) / H, h = static_cast<int>(bh) - b * H;
    uint32_t mask = 0;
    for (int i = 0; i < T; ++i) {
      mask |= static_cast<uint32_t>(keep == nullptr || keep[b * p.keep_sb + h * p.keep_sh + i * p.keep_st]) << i;
    }
    kept_mask[bh] = mask;
    return __popc(mask);
  };
  if (!pg::plan_take<kPlanThreads>(t, BH, kept, s, status, gated)) return;
  __syncthreads();  // the pages just popped into the table and kept_mask are visible to the whole block

  // Source and destination of every new row, one thread per row (B * H * T <= kFusedMaxRows: 32-bit indices).
  const int rows = static_cast<int>(BH) * T;
  for (int r = threadIdx.x; r < rows; r += kPlanThreads) {
    const int bh = r / T, i = r - bh * T, b = bh / H, h = bh - b * H;
    const uint32_t mask = kept_mask[bh];
    int64_t k_off = -1, v_off = -1;
    if ((mask >> i) & 1u) {
      const int64_t dst = s.old_len[bh] + __popc(mask & ((1u << i) - 1u));
      int64_t index, slot;
      t.locate(dst, index, slot);
      const int64_t page = t.page(bh, index);
      k_off = p.kp.at(page, slot);
      v_off = p.vp.at(page, slot);
    }
    dst_k[r] = k_off;
    dst_v[r] = v_off;
    src_k[r] = b * p.k_sb + h * p.k_sh + i * p.k_st;
    src_v[r] = b * p.v_sb + h * p.v_sh + i * p.v_st;
  }
  __syncthreads();
  const int units = p.units_per_row;
  for (int j = threadIdx.x; j < rows * units; j += kPlanThreads) {
    const int r = j / units;
    if (dst_k[r] < 0) continue;
    const int64_t col = static_cast<int64_t>(j - r * units) * kVec;
    cuda::copy_elems<scalar_t, kVec>(key_pages + dst_k[r] + col, key + src_k[r] + col);
    cuda::copy_elems<scalar_t, kVec>(value_pages + dst_v[r] + col, value + src_v[r] + col);
  }
}

template <int kThreadsPlan>
__global__ void __launch_bounds__(kThreadsPlan) append_plan_kernel(
    const pg::Tables t,
    int32_t* __restrict__ counts,  // (B * H, nchunks) kept rows per chunk in, exclusive prefixes out; null: all kept
    const pg::HeadScratch s, int32_t* __restrict__ status, const int64_t BH, const int64_t nchunks, const int64_t T,
    const bool gated) {
  auto kept = [&](int64_t bh) -> int64_t {
    if (counts == nullptr) return T;
    return pg::exclusive_chunk_prefix(counts + bh * nchunks, nchunks);
  };
  pg::plan_take<kThreadsPlan>(t, BH, kept, s, status, gated);
}

template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads) append_rows_kernel(
    scalar_t* __restrict__ key_pages,     // the pools (P, S, D) or the rectangle (B, H, C, D)
    scalar_t* __restrict__ value_pages,
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
  __shared__ int64_t dst_k[kChunk], dst_v[kChunk];  // element offsets of the destination rows
  if (*status != 0) return;  // some head failed validation: nothing may be written anywhere

  const int64_t item = blockIdx.x;  // = bh * nchunks + chunk
  const int64_t bh = item / p.nchunks, chunk = item - bh * p.nchunks;
  int64_t b, h;
  t.split(bh, b, h);
  const int64_t t0 = chunk * kChunk;
  const int64_t row = t0 + threadIdx.x;
  const bool flag = row < p.T && (keep == nullptr || keep[b * p.keep_sb + h * p.keep_sh + row * p.keep_st]);
  int n = 0;
  const int pos = cuda::block_exclusive_count<kThreads>(flag, warp_counts, n);
  if (flag) {
    // With keep == null every row is kept, so the chunk's first destination is simply its first row.
    const int64_t dst = old_len[bh] + (offsets != nullptr ? offsets[item] : t0) + pos;
    int64_t index, slot;
    t.locate(dst, index, slot);
    const int64_t page = t.page(bh, index);
    src_rows[pos] = static_cast<int>(threadIdx.x);
    dst_k[pos] = p.kp.at(page, slot);
    dst_v[pos] = p.vp.at(page, slot);
  }
  __syncthreads();
  const int units = p.units_per_row;
  const scalar_t* ksrc = key + b * p.k_sb + h * p.k_sh + t0 * p.k_st;
  const scalar_t* vsrc = value + b * p.v_sb + h * p.v_sh + t0 * p.v_st;
  if (units >= kThreads) {  // wide rows: the block copies one row at a time
    for (int r = 0; r < n; ++r) {
      cuda::copy_row_units<scalar_t, kVec>(key_pages + dst_k[r], value_pages + dst_v[r], ksrc + src_rows[r] * p.k_st,
                                           vsrc + src_rows[r] * p.v_st, threadIdx.x, units, kThreads);
    }
    return;
  }
  for (int i = threadIdx.x; i < n * units; i += kThreads) {
    const int r = i / units;
    const int64_t col = static_cast<int64_t>(i - r * units) * kVec;
    cuda::copy_elems<scalar_t, kVec>(key_pages + dst_k[r] + col, ksrc + src_rows[r] * p.k_st + col);
    cuda::copy_elems<scalar_t, kVec>(value_pages + dst_v[r] + col, vsrc + src_rows[r] * p.v_st + col);
  }
}

}  // namespace

void enqueue_append_kv_cuda(const pg::Tables& t, Tensor& key_pages, Tensor& value_pages, const pg::Pool& key_pool,
                            const pg::Pool& value_pool, const Tensor& key, const Tensor& value,
                            const std::optional<Tensor>& keep, int32_t* status, bool gated) {
  const int64_t BH = t.B * t.H, T = key.size(2), D = key.size(3);
  const cudaStream_t stream = cuda::current_stream();
  const bool has_keep = keep.has_value();
  const bool fused = T <= kFusedMaxT && BH * T <= kFusedMaxRows && BH <= kFusedMaxHeads;
  const int64_t nchunks = fused ? 0 : cuda::ceil_div(T, kChunk);
  AG_CHECK(BH * nchunks <= std::numeric_limits<int32_t>::max(), "append: B * H * ceil(T / ", kChunk,
           ") must fit in a CUDA grid, got ", BH * nchunks);

  // Scratch: [old_len, new_len, count, before: BH each][chunk offsets: BH * nchunks when keep is given]. The plan
  // writes every word that it or the copy kernel reads, so nothing needs zeroing.
  const int64_t offset_words = has_keep ? BH * nchunks : 0;
  const Tensor scratch = empty_like_device({std::max<int64_t>(4 * BH + offset_words, 1)}, kInt, key);
  int32_t* words = scratch.mutable_data_ptr<int32_t>();
  const pg::HeadScratch heads = pg::carve_heads(words, BH);
  int32_t* offsets = has_keep && nchunks > 0 ? words + 4 * BH : nullptr;

  AppendParams p;
  p.T = T;
  p.nchunks = nchunks;
  p.kp = key_pool;
  p.vp = value_pool;
  p.k_sb = key.stride(0), p.k_sh = key.stride(1), p.k_st = key.stride(2);
  p.v_sb = value.stride(0), p.v_sh = value.stride(1), p.v_st = value.stride(2);
  p.keep_sb = has_keep ? keep->stride(0) : 0, p.keep_sh = has_keep ? keep->stride(1) : 0;
  p.keep_st = has_keep ? keep->stride(2) : 0;
  const bool* keep_ptr = has_keep ? keep->const_data_ptr<bool>() : nullptr;
  const bool vec = D > 0 && rows_aligned_for(16, {&key_pages, &value_pages, &key, &value});

  ATTNGATE_DISPATCH_FLOATING_TYPES(key.scalar_type(), "append_kv_cuda", [&] {
    const int64_t vec_width = vec ? 16 / static_cast<int64_t>(sizeof(scalar_t)) : 1;
    AG_CHECK(D / vec_width * kFusedMaxRows <= std::numeric_limits<int32_t>::max(), "append: head dim D = ", D,
             " is too large");
    p.units_per_row = static_cast<int>(D / vec_width);
    if (fused) {
      auto kernel = vec ? append_fused_kernel<scalar_t, true> : append_fused_kernel<scalar_t, false>;
      kernel<<<1, kPlanThreads, 0, stream>>>(
          key_pages.mutable_data_ptr<scalar_t>(), value_pages.mutable_data_ptr<scalar_t>(), t,
          key.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(), keep_ptr, heads, status, BH, p, gated);
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
          key.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(), keep_ptr, offsets, heads.old_len, status,
          p);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void enqueue_paged_append_kv_cuda(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                                  Tensor& free_pages, Tensor& free_count, const Tensor& key, const Tensor& value,
                                  const std::optional<Tensor>& keep, int32_t* status) {
  enqueue_append_kv_cuda(pg::make_tables(key_pages, page_table, lengths, free_pages, free_count), key_pages,
                         value_pages, pg::make_pool(key_pages), pg::make_pool(value_pages), key, value, keep,
                         status, /*gated=*/true);
}

namespace {

void paged_append_kv_cuda(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                          Tensor& free_pages, Tensor& free_count, const Tensor& key, const Tensor& value,
                          const std::optional<Tensor>& keep) {
  check_paged_append_args(key_pages, value_pages, page_table, lengths, free_pages, free_count, key, value, keep);
  const cuda::DeviceGuard device_guard(key_pages);
  const Tensor scratch = cuda::make_status_scratch(key_pages, 0, 0);  // the plan always writes the status word
  enqueue_append_kv_cuda(pg::make_tables(key_pages, page_table, lengths, free_pages, free_count), key_pages,
                         value_pages, pg::make_pool(key_pages), pg::make_pool(value_pages), key, value, keep,
                         scratch.mutable_data_ptr<int32_t>(), /*gated=*/false);
  cuda::check_status("paged_append_kv_", scratch);
}

}  // namespace

ATTNGATE_IMPL(CUDA, paged_append_kv_, paged_append_kv_cuda);

}  // namespace attngate
