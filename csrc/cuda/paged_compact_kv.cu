// paged_compact_kv_: stable in-place compaction of each head's paged rows; the pages that empty go back onto the
// free stack on the device (semantics: attngate_ext/ops/paged_reference.py).
//
//   1. count_kernel   one block per (head, chunk of logical rows): kept live rows, and the chunk's page ids
//   2. plan_kernel    one block: chunk prefixes, validation of every head, then (all or nothing) the pages given
//                     back (pushed, table entries -1), lengths and free_count
//   3. rows_kernel    one block per (head, chunk): the moves, as compact_kv_'s compact_rows_kernel
// The plan gives the pages back BEFORE the rows move; the moves find a source row in a page given back on the
// free stack where the plan pushed it (pg::page_after_give_back), so no fourth launch is needed.
//
// In-place moves of one head run in parallel over its chunks, race-free by compact_kv_'s rules (logical rows
// here): a kept row only moves down (dst <= src), each block stages its chunk's moving rows in shared memory and
// publishes "read done", and a block waits for the read-done flags of the lower chunks its destination range
// overlaps before writing. Blocks take work items from an atomic ticket in increasing order and only wait for
// lower tickets, so no deadlock. Rows before a head's first dropped row never move and are neither read nor
// written; a chunk with no moving row only publishes its flag.
#include <algorithm>
#include <limits>

#include "checks.h"
#include "cuda/stable_cuda.cuh"
#include "cuda_utils.cuh"
#include "dispatch.h"
#include "paged_storage_checks.h"
#include "paged_storage_cuda.cuh"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

namespace pg = cuda::paged;

constexpr int kPlanThreads = 512;
constexpr int kThreads = 256;
constexpr int kMaxChunk = kThreads;         // one keep flag per thread
// Dynamic smem per block; with the ~4.2 KB of static smem a block stays under the 48 KB that needs no opt-in.
constexpr int64_t kSmemBudget = 42 * 1024;

struct CompactParams {
  int64_t nchunks, L;
  pg::PoolStrides kp, vp;  // key_pages / value_pages (page, slot) strides
  int64_t keep_sb, keep_sh, keep_st;
  int chunk_rows;          // logical rows per chunk
  int units_per_row;       // D / vector width
  int D;                   // row pitch of the shared-memory tile, in elements
};

// Rows of head bh's chunk that the count and move kernels look at: [row0, min(row0 + chunk_rows, limit)).
__device__ __forceinline__ bool chunk_flag(const bool* keep, const CompactParams& p, int64_t bh, int64_t H,
                                           int64_t row, int64_t limit) {
  return static_cast<int>(threadIdx.x) < p.chunk_rows && row < limit &&
         keep[(bh / H) * p.keep_sb + (bh % H) * p.keep_sh + row * p.keep_st];
}

__global__ void __launch_bounds__(kThreads) count_kernel(
    const pg::Tables t,
    const bool* __restrict__ keep,   // (B, H, L)
    int32_t* __restrict__ counts,    // (B * H, nchunks) out
    int32_t* __restrict__ bad_ids,   // (1) zeroed; kStatusBadPageId when a used page id is outside [0, P)
    const CompactParams p) {
  const int64_t item = blockIdx.x;  // = bh * nchunks + chunk
  const int64_t bh = item / p.nchunks, row0 = (item % p.nchunks) * p.chunk_rows;
  // An invalid length only has to keep the reads in bounds: the plan reports it and nothing is written.
  const int64_t len = *t.length(bh);
  const int64_t limit = len < 0 ? 0 : std::min(len, std::min(t.M * t.S, p.L));
  const int n = __syncthreads_count(chunk_flag(keep, p, bh, t.H, row0 + threadIdx.x, limit));
  if (threadIdx.x == 0) counts[item] = n;
  // The pages of this chunk's rows (a page shared with the neighbour chunk is checked twice).
  const int64_t end = std::min(row0 + p.chunk_rows, limit);
  if (row0 < end) {
    for (int64_t i = row0 / t.S + threadIdx.x; i <= (end - 1) / t.S; i += kThreads) {
      if (!t.id_ok(*t.entry(bh, i))) atomicOr(bad_ids, kStatusBadPageId);
    }
  }
}

template <int kThreadsPlan>
__global__ void __launch_bounds__(kThreadsPlan) plan_kernel(
    const pg::Tables t,
    int32_t* __restrict__ counts,         // (B * H, nchunks) chunk counts in, exclusive prefixes out
    const int32_t* __restrict__ bad_ids,  // (1) from count_kernel
    const pg::HeadScratch s, int32_t* __restrict__ status, int32_t* __restrict__ free0, const int64_t BH,
    const int64_t nchunks, const int64_t L) {
  __shared__ int stage[pg::kStages];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x < pg::kStages) stage[threadIdx.x] = 0;
  __syncthreads();
  for (int64_t bh = warp; bh < BH; bh += kThreadsPlan / 32) {
    const int64_t kept = pg::warp_exclusive_prefix(counts + bh * nchunks, nchunks, lane);
    if (lane == 0) {
      int64_t old = *t.length(bh), next = kept;
      if (old < 0 || old > t.M * t.S) {
        atomicOr(&stage[0], kStatusLengthOutOfRange);
        old = next = 0;
      } else if (old > L) {
        atomicOr(&stage[1], kStatusKeepTooShort);
        next = old;
      }
      s.old_len[bh] = static_cast<int32_t>(old);
      s.new_len[bh] = static_cast<int32_t>(next);
    }
  }
  if (threadIdx.x == 0) stage[2] = *bad_ids;
  __syncthreads();
  pg::plan_give_back<kThreadsPlan>(t, BH, s, stage, status, free0);
}

template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads) rows_kernel(
    scalar_t* __restrict__ key_pages,     // (P, S, D)
    scalar_t* __restrict__ value_pages,   // (P, S, D)
    const pg::Tables t,                   // after the give-back
    const bool* __restrict__ keep,        // (B, H, L)
    const int32_t* __restrict__ offsets,  // (B * H, nchunks) kept rows of the head before each chunk
    const pg::HeadScratch s,              // old_len / new_len / before of every head
    const int32_t* __restrict__ status,   // (1) written by the plan
    const int32_t* __restrict__ free0,    // (1) free_count before the give-back
    int32_t* __restrict__ ticket,         // (1) zeroed
    int32_t* __restrict__ read_done,      // (B * H * nchunks) zeroed
    const CompactParams p) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  extern __shared__ uint4 smem_tile[];  // chunk_rows moving K rows, then as many V rows, D elements each
  __shared__ int warp_counts[kThreads / 32];
  __shared__ int32_t src_page[kMaxChunk], dst_page[kMaxChunk];  // page ids < P < 2^31
  __shared__ int src_slot[kMaxChunk], dst_slot[kMaxChunk];
  __shared__ int item_s;
  if (threadIdx.x == 0) item_s = atomicAdd(ticket, 1);
  __syncthreads();
  if (*status != 0) return;  // uniform: when it returns, every block returns and nobody waits

  const int64_t item = item_s;  // = bh * nchunks + chunk, taken in ticket order
  const int64_t bh = item / p.nchunks, chunk = item % p.nchunks;
  const int CH = p.chunk_rows;
  const int64_t row0 = chunk * CH;
  const int64_t dst0 = offsets[item];
  const bool flag = chunk_flag(keep, p, bh, t.H, row0 + threadIdx.x, s.old_len[bh]);
  int n = 0;
  const int pos = cuda::block_exclusive_count<kThreads>(flag, warp_counts, n);
  // Kept rows that are already in place (dst == src) lead the chunk's kept rows: only [stay, n) move.
  const int stay = __syncthreads_count(flag && dst0 + pos == row0 + threadIdx.x);
  if (flag && pos >= stay) {
    const int64_t free_base = *free0, src = row0 + threadIdx.x, dst = dst0 + pos;
    src_page[pos - stay] = static_cast<int32_t>(pg::page_after_give_back(t, s, free_base, bh, src / t.S));
    src_slot[pos - stay] = static_cast<int>(src % t.S);
    dst_page[pos - stay] = *t.entry(bh, dst / t.S);  // dst < new length: still in the table
    dst_slot[pos - stay] = static_cast<int>(dst % t.S);
  }
  __syncthreads();

  const int moving = n - stay;
  scalar_t* ktile = reinterpret_cast<scalar_t*>(smem_tile);
  scalar_t* vtile = ktile + static_cast<int64_t>(CH) * p.D;
  const int units = p.units_per_row;
  for (int i = threadIdx.x; i < moving * units; i += kThreads) {
    const int r = i / units;
    const int col = (i - r * units) * kVec;
    cuda::copy_elems<scalar_t, kVec>(ktile + r * p.D + col, key_pages + p.kp.at(src_page[r], src_slot[r]) + col);
    cuda::copy_elems<scalar_t, kVec>(vtile + r * p.D + col, value_pages + p.vp.at(src_page[r], src_slot[r]) + col);
  }
  __syncthreads();  // every moving source row of this chunk is now in shared memory
  if (threadIdx.x == 0) {
    __threadfence();
    atomicExch(read_done + item, 1);
  }
  if (moving == 0) return;

  // Destination range [dst0 + stay, dst0 + n): wait for the lower chunks whose source rows it overlaps.
  const int64_t first = (dst0 + stay) / CH;
  const int64_t last = std::min<int64_t>((dst0 + n - 1) / CH, chunk - 1);
  cuda::wait_for_chunks_read(read_done + bh * p.nchunks, first, last);

  for (int i = threadIdx.x; i < moving * units; i += kThreads) {
    const int r = i / units;
    const int col = (i - r * units) * kVec;
    cuda::copy_elems<scalar_t, kVec>(key_pages + p.kp.at(dst_page[r], dst_slot[r]) + col, ktile + r * p.D + col);
    cuda::copy_elems<scalar_t, kVec>(value_pages + p.vp.at(dst_page[r], dst_slot[r]) + col, vtile + r * p.D + col);
  }
}

void paged_compact_kv_cuda(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                           Tensor& free_pages, Tensor& free_count, const Tensor& keep) {
  check_paged_compact_args(key_pages, value_pages, page_table, lengths, free_pages, free_count, keep);
  const int64_t BH = page_table.size(0) * page_table.size(1), D = key_pages.size(2), L = keep.size(2);
  const cuda::DeviceGuard device_guard(key_pages);
  const cudaStream_t stream = cuda::current_stream();
  const pg::Tables t = pg::make_tables(key_pages, page_table, lengths, free_pages, free_count);

  // Chunk rows: as many row pairs (K and V) as fit the shared-memory budget, at most one per thread. Very wide
  // rows fall back to the opt-in shared-memory limit with fewer rows per chunk.
  const int64_t pair_bytes = 2 * D * static_cast<int64_t>(key_pages.element_size());
  int64_t smem_limit = kSmemBudget;
  if (pair_bytes > smem_limit) {
    smem_limit = static_cast<int64_t>(cuda::device_facts().sharedMemPerBlockOptin) - 8192;
  }
  AG_CHECK(pair_bytes <= smem_limit, "paged_compact_kv_: a key and a value row (", pair_bytes,
           " bytes) must fit in shared memory (", smem_limit, " bytes) on this device");
  const int64_t CH = pair_bytes > 0 ? std::min<int64_t>(kMaxChunk, smem_limit / pair_bytes) : kMaxChunk;
  const int64_t nchunks = cuda::ceil_div(std::min(page_table.size(2) * key_pages.size(1), L), CH);
  const int64_t nitems = BH * nchunks;
  AG_CHECK(nitems <= std::numeric_limits<int32_t>::max(), "paged_compact_kv_: B * H * ceil(min(M * page_size, L) / ",
           CH, ") must fit in a CUDA grid, got ", nitems);

  // Scratch: [status][ticket][bad_ids][free0][read_done: nitems][chunk counts / offsets: nitems][heads: 4 * BH].
  const Tensor scratch = cuda::make_status_scratch(key_pages, 3 + 2 * nitems + 4 * BH, 4 + nitems);
  int32_t* status = scratch.mutable_data_ptr<int32_t>();
  int32_t* ticket = status + 1;
  int32_t* bad_ids = status + 2;
  int32_t* free0 = status + 3;
  int32_t* read_done = status + 4;
  int32_t* offsets = read_done + nitems;
  const pg::HeadScratch heads = pg::carve_heads(offsets + nitems, BH);

  CompactParams p;
  p.nchunks = nchunks;
  p.L = L;
  p.kp = {key_pages.stride(0), key_pages.stride(1)};
  p.vp = {value_pages.stride(0), value_pages.stride(1)};
  p.keep_sb = keep.stride(0), p.keep_sh = keep.stride(1), p.keep_st = keep.stride(2);
  p.chunk_rows = static_cast<int>(CH);
  p.D = static_cast<int>(D);  // CH * D * 2 elements fit in shared memory, so D fits in int
  const bool* keep_ptr = keep.const_data_ptr<bool>();
  if (nitems > 0) {
    count_kernel<<<static_cast<unsigned>(nitems), kThreads, 0, stream>>>(t, keep_ptr, offsets, bad_ids, p);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
  plan_kernel<kPlanThreads><<<1, kPlanThreads, 0, stream>>>(t, offsets, bad_ids, heads, status, free0, BH, nchunks, L);
  STD_CUDA_KERNEL_LAUNCH_CHECK();

  if (nitems > 0 && D > 0) {
    const bool vec = rows_aligned_for(16, {&key_pages, &value_pages});
    ATTNGATE_DISPATCH_FLOATING_TYPES(key_pages.scalar_type(), "paged_compact_kv_cuda", [&] {
      p.units_per_row = static_cast<int>(vec ? D / (16 / static_cast<int64_t>(sizeof(scalar_t))) : D);
      const size_t smem = static_cast<size_t>(CH * pair_bytes);
      auto kernel = vec ? rows_kernel<scalar_t, true> : rows_kernel<scalar_t, false>;
      if (smem > kSmemBudget) {
        STD_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      }
      kernel<<<static_cast<unsigned>(nitems), kThreads, smem, stream>>>(
          key_pages.mutable_data_ptr<scalar_t>(), value_pages.mutable_data_ptr<scalar_t>(), t, keep_ptr, offsets, heads,
          status, free0, ticket, read_done, p);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  cuda::check_status("paged_compact_kv_", scratch);
}

}  // namespace
ATTNGATE_IMPL(CUDA, paged_compact_kv_, paged_compact_kv_cuda);

}  // namespace attngate
