// paged_remove_rows_: deletes the listed rows of each head by moving its last surviving rows into the holes, O(K)
// row moves per head; the pages that empty go back onto the free stack (semantics:
// attngate_ext/ops/paged_reference.py).
//
// With n rows and r deletions the new length is m = n - r; the holes are the deleted rows below m and the movers
// the surviving rows of [m, n), both ascending, as many of each. Sources (>= m) and destinations (< m) never
// meet, so all moves run in parallel.
//   1. head_kernel   one block per head: validates its rows (live, distinct) and sorts them by ranking (O(K^2 /
//                    threads), K is small), checks its page ids, records m and the hole count
//   2. plan_kernel   one block: validation of the whole call, then (all or nothing) the pages given back, lengths,
//                    free_count
//   3. moves_kernel  one block per head: the j-th mover is m + j + #{deleted rows d_i >= m with d_i - m - i <= j}
//                    (a binary search over the sorted deleted rows), moved onto the j-th hole
// A mover in a page given back is found on the free stack where the plan pushed it (pg::page_after_give_back).
#include <algorithm>
#include <limits>

#include "checks.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/paged_storage.cuh"
#include "cuda/stable_cuda.cuh"
#include "dispatch.h"
#include "paged_storage_checks.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

namespace pg = cuda::paged;

constexpr int kPlanThreads = 512;
constexpr int kThreads = 256;

struct MoveParams {
  pg::Pool kp, vp;         // key_pages / value_pages rows
  int64_t K;
  int units_per_row;       // D / vector width
};

__global__ void __launch_bounds__(kThreads) head_kernel(
    const pg::Tables t,
    const int32_t* __restrict__ rows,  // (B, H, K), strides r_sb, r_sh, r_sk
    int32_t* __restrict__ sorted,      // (B * H, K) out: the head's deleted rows, ascending, in [0, r)
    int32_t* __restrict__ holes,       // (B * H) out: deleted rows below the new length
    const pg::HeadScratch s,           // out: old_len, new_len
    int32_t* __restrict__ stages,      // (3) zeroed: [0] lengths, [1] rows, [2] page ids
    const int64_t K, const int64_t r_sb, const int64_t r_sh, const int64_t r_sk) {
  const int64_t bh = blockIdx.x;
  const int64_t n = *t.length(bh);
  if (n < 0 || n > t.capacity()) {  // uniform over the block
    if (threadIdx.x == 0) {
      atomicOr(stages + 0, kStatusLengthOutOfRange);
      s.old_len[bh] = s.new_len[bh] = holes[bh] = 0;
    }
    return;
  }
  const int32_t* head = rows + (bh / t.H) * r_sb + (bh % t.H) * r_sh;
  int32_t* out = sorted + bh * K;
  bool bad_row = false;
  int64_t valid = 0;
  for (int64_t base = 0; base < K; base += kThreads) {
    const int64_t k = base + threadIdx.x;
    const int64_t v = k < K ? head[k * r_sk] : -1;
    if (v >= 0) {
      // Rank among the valid entries, ties broken by position so that even duplicates get distinct slots.
      int64_t rank = 0;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t u = head[j * r_sk];
        rank += u >= 0 && (u < v || (u == v && j < k));
        bad_row |= u == v && j != k;
      }
      bad_row |= v >= n;
      out[rank] = static_cast<int32_t>(v);
    }
    valid += __syncthreads_count(v >= 0);
  }
  const int64_t m = n - valid;
  __syncthreads();  // `out` is complete
  int64_t n_holes = 0;
  for (int64_t base = 0; base < valid; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    n_holes += __syncthreads_count(i < valid && out[i] < m);
  }
  bool bad_id = false;
  for (int64_t i = threadIdx.x; i < pg::pages_for(n, t.S); i += kThreads) bad_id |= !t.id_ok(*t.entry(bh, i));
  bad_row = __syncthreads_or(bad_row);
  bad_id = __syncthreads_or(bad_id);
  if (threadIdx.x == 0) {
    if (bad_row) atomicOr(stages + 1, kStatusBadRow);
    if (bad_id) atomicOr(stages + 2, kStatusBadPageId);
    s.old_len[bh] = static_cast<int32_t>(n);
    s.new_len[bh] = static_cast<int32_t>(bad_row ? n : m);  // keeps the plan's page counts sane; it fails anyway
    holes[bh] = static_cast<int32_t>(bad_row ? 0 : n_holes);
  }
}

template <int kThreadsPlan>
__global__ void __launch_bounds__(kThreadsPlan) plan_kernel(const pg::Tables t, const int32_t* __restrict__ stages,
                                                            const pg::HeadScratch s, int32_t* __restrict__ status,
                                                            int32_t* __restrict__ free0, const int64_t BH) {
  __shared__ int stage[pg::kStages];
  if (threadIdx.x < pg::kStages) stage[threadIdx.x] = threadIdx.x < 3 ? stages[threadIdx.x] : 0;
  __syncthreads();
  pg::plan_give_back<kThreadsPlan>(t, BH, s, stage, status, free0);
}

template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads) moves_kernel(
    scalar_t* __restrict__ key_pages,     // (P, S, D)
    scalar_t* __restrict__ value_pages,   // (P, S, D)
    const pg::Tables t,                   // after the give-back
    const int32_t* __restrict__ sorted,   // (B * H, K) deleted rows, ascending
    const int32_t* __restrict__ holes,    // (B * H)
    const pg::HeadScratch s,              // old_len / new_len / before of every head
    const int32_t* __restrict__ status,   // (1) written by the plan
    const int32_t* __restrict__ free0,    // (1) free_count before the give-back
    const MoveParams p) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  __shared__ int64_t k_src[kThreads], k_dst[kThreads], v_src[kThreads], v_dst[kThreads];  // element offsets
  if (*status != 0) return;
  const int64_t bh = blockIdx.x;
  const int64_t n_holes = holes[bh];
  const int64_t m = s.new_len[bh];
  const int32_t* gone = sorted + bh * p.K;
  const int32_t* high = gone + n_holes;  // the deleted rows >= m
  const int64_t n_high = s.old_len[bh] - m - n_holes;
  const int64_t free_base = *free0;
  const int units = p.units_per_row;
  for (int64_t base = 0; base < n_holes; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    if (j < n_holes) {
      // #{i : high[i] - m - i <= j}: high[i] - m - i (surviving rows of [m, high[i])) never decreases with i.
      int64_t lo = 0, hi = n_high;
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (high[mid] - m - mid <= j) lo = mid + 1;
        else hi = mid;
      }
      const int64_t src = m + j + lo, dst = gone[j];
      int64_t si, ss, di, ds;
      t.locate(src, si, ss);
      t.locate(dst, di, ds);
      const int64_t src_page = pg::page_after_give_back(t, s, free_base, bh, si);
      const int64_t dst_page = *t.entry(bh, di);  // dst < m: still in the table
      k_src[threadIdx.x] = p.kp.at(src_page, ss);
      v_src[threadIdx.x] = p.vp.at(src_page, ss);
      k_dst[threadIdx.x] = p.kp.at(dst_page, ds);
      v_dst[threadIdx.x] = p.vp.at(dst_page, ds);
    }
    __syncthreads();
    const int tile = static_cast<int>(std::min<int64_t>(kThreads, n_holes - base));
    for (int i = threadIdx.x; i < tile * units; i += kThreads) {
      const int r = i / units;
      const int col = (i - r * units) * kVec;
      cuda::copy_elems<scalar_t, kVec>(key_pages + k_dst[r] + col, key_pages + k_src[r] + col);
      cuda::copy_elems<scalar_t, kVec>(value_pages + v_dst[r] + col, value_pages + v_src[r] + col);
    }
    __syncthreads();  // the tile's addresses are rewritten next
  }
}

void paged_remove_rows_cuda(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                            Tensor& free_pages, Tensor& free_count, const Tensor& rows) {
  check_paged_remove_args(key_pages, value_pages, page_table, lengths, free_pages, free_count, rows);
  const int64_t BH = page_table.size(0) * page_table.size(1), D = key_pages.size(2), K = rows.size(2);
  AG_CHECK(BH <= std::numeric_limits<int32_t>::max(), "paged_remove_rows_: B * H must fit in a CUDA grid, got ", BH);
  AG_CHECK(K <= std::numeric_limits<int32_t>::max(), "rows must have K < 2^31, got ", K);
  const cuda::DeviceGuard device_guard(key_pages);
  const cudaStream_t stream = cuda::current_stream();
  const pg::Tables t = pg::make_tables(key_pages, page_table, lengths, free_pages, free_count);

  // Scratch: [status][free0][stages: 3, zeroed][heads: 4 * BH][holes: BH][sorted: BH * K].
  const Tensor scratch = cuda::make_status_scratch(key_pages, 4 + 5 * BH + BH * K, 5);
  int32_t* status = scratch.mutable_data_ptr<int32_t>();
  int32_t* free0 = status + 1;
  int32_t* stages = status + 2;
  const pg::HeadScratch heads = pg::carve_heads(status + 5, BH);
  int32_t* holes = status + 5 + 4 * BH;
  int32_t* sorted = holes + BH;

  if (BH > 0) {
    head_kernel<<<static_cast<unsigned>(BH), kThreads, 0, stream>>>(t, rows.mutable_data_ptr<int32_t>(), sorted, holes,
                                                                    heads, stages, K, rows.stride(0), rows.stride(1),
                                                                    rows.stride(2));
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
  plan_kernel<kPlanThreads><<<1, kPlanThreads, 0, stream>>>(t, stages, heads, status, free0, BH);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  if (BH > 0 && K > 0 && D > 0) {
    const bool vec = rows_aligned_for(16, {&key_pages, &value_pages});
    ATTNGATE_DISPATCH_FLOATING_TYPES(key_pages.scalar_type(), "paged_remove_rows_cuda", [&] {
      MoveParams p;
      p.kp = pg::make_pool(key_pages);
      p.vp = pg::make_pool(value_pages);
      p.K = K;
      const int64_t vec_width = vec ? 16 / static_cast<int64_t>(sizeof(scalar_t)) : 1;
      AG_CHECK(D / vec_width * kThreads <= std::numeric_limits<int32_t>::max(), "paged_remove_rows_: head dim D = ", D,
               " is too large");
      p.units_per_row = static_cast<int>(D / vec_width);
      auto kernel = vec ? moves_kernel<scalar_t, true> : moves_kernel<scalar_t, false>;
      kernel<<<static_cast<unsigned>(BH), kThreads, 0, stream>>>(key_pages.mutable_data_ptr<scalar_t>(),
                                                                 value_pages.mutable_data_ptr<scalar_t>(), t, sorted,
                                                                 holes, heads, status, free0, p);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  cuda::check_status("paged_remove_rows_", scratch);
}

}  // namespace
ATTNGATE_IMPL(CUDA, paged_remove_rows_, paged_remove_rows_cuda);

}  // namespace attngate
