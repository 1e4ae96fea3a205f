// The CUDA compaction kernel of both cache layouts (csrc/kv_tables.h): paged_compact_kv_ and, on a rectangle cache,
// compact_kv_ (cuda/compact_kv.cu). Stable in-place compaction of each head's rows; a paged cache's pages that
// empty go back onto the free stack on the device (semantics: attngate_ext/ops/paged_reference.py).
//
//   1. count_kernel   one block per (head, chunk of logical rows): kept live rows, and the ids of the chunk's pages
//   2. plan_kernel    one block, one thread per head: chunk prefixes, validation, then (all or nothing) the pages
//                     given back (pushed, one thread per page; table entries -1), lengths and free_count
//   3. rows_kernel    one block per (head, chunk): the moves (wide_kernel instead for rows too wide for shared
//                     memory: one block per head, rows moved one after another)
// The plan gives the pages back BEFORE the rows move; the moves find a source row in a page given back on the
// free stack where the plan pushed it (pg::page_after_give_back), so no fourth launch is needed.
//
// In-place moves of one head run in parallel over its chunks, race-free by these rules (logical rows):
//   * A kept row only moves down: its destination (kept rows before it) is <= its source index. So chunk k only
//     writes rows < (k + 1) * CH, i.e. into its own source range and those of lower chunks, never into higher.
//   * Each block first copies its chunk's moving rows into shared memory, then publishes a per-chunk "read done"
//     flag (__threadfence + atomic). Its own rows are covered by the __syncthreads between reading and writing.
//   * Before writing, a block waits for the read-done flags of the (at most two) lower chunks whose source range
//     its destination range overlaps. Nobody else writes into chunk j's range before it was read.
//   * Blocks take their (head, chunk) work item from an atomic ticket counter, in increasing order. A block only
//     waits for lower tickets, whose blocks are therefore already resident, and the read phase itself never
//     waits, so every awaited flag is eventually published: no deadlock, whatever the block scheduling.
// Rows before a head's first dropped row never move and are neither read nor written (a stationary row is never a
// destination of another block); a chunk with no moving row only publishes its flag. The ticket counter and the
// flags are zeroed by an async memset on the current stream (graph capturable).
#include <algorithm>
#include <limits>

#include "checks.h"
#include "cuda/cuda_utils.cuh"
#include "cuda/launch_cache.cuh"
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
constexpr int kThreads = 256;
constexpr int kMaxChunk = kThreads;         // one keep flag per thread
// Dynamic smem per block; with the ~6 KB of static smem a block stays under the 48 KB that needs no opt-in.
constexpr int64_t kSmemBudget = 40 * 1024;

struct CompactParams {
  int64_t nchunks, L;
  pg::Pool kp, vp;         // where the cache's rows are
  int64_t keep_sb, keep_sh, keep_st;
  int chunk_rows;          // logical rows per chunk
  int units_per_row;       // D / vector width
  int D;                   // row pitch of the shared-memory tile, in elements
};

// Rows of head bh's chunk that the count and move kernels look at: [row0, min(row0 + chunk_rows, limit)).
__device__ __forceinline__ bool chunk_flag(const bool* keep, const CompactParams& p, int64_t b, int64_t h,
                                           int64_t row, int64_t limit) {
  return static_cast<int>(threadIdx.x) < p.chunk_rows && row < limit &&
         keep[b * p.keep_sb + h * p.keep_sh + row * p.keep_st];
}

__global__ void __launch_bounds__(kThreads) count_kernel(
    const pg::Tables t,
    const bool* __restrict__ keep,   // (B, H, L)
    int32_t* __restrict__ counts,    // (B * H, nchunks) out
    int32_t* __restrict__ bad_ids,   // (1) zeroed; kStatusBadPageId when a used page id is outside [0, P)
    const CompactParams p) {
  const int64_t item = blockIdx.x;  // = bh * nchunks + chunk
  const int64_t bh = item / p.nchunks, row0 = (item - bh * p.nchunks) * p.chunk_rows;
  int64_t b, h;
  t.split(bh, b, h);
  // An invalid length only has to keep the reads in bounds: the plan reports it and nothing is written.
  const int64_t len = *t.length(bh);
  const int64_t limit = len < 0 ? 0 : std::min(len, std::min(t.capacity(), p.L));
  const int n = __syncthreads_count(chunk_flag(keep, p, b, h, row0 + threadIdx.x, limit));
  if (threadIdx.x == 0) counts[item] = n;
  // The pages of this chunk's rows (a page shared with the neighbour chunk is checked twice).
  const int64_t end = std::min(row0 + p.chunk_rows, limit);
  if (!t.owns_pages() && row0 < end) {
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
  if (threadIdx.x < pg::kStages) stage[threadIdx.x] = 0;
  __syncthreads();
  for (int64_t bh = threadIdx.x; bh < BH; bh += kThreadsPlan) {  // one thread per head
    const int64_t kept = pg::exclusive_chunk_prefix(counts + bh * nchunks, nchunks);
    int64_t old = *t.length(bh), next = kept;
    if (old < 0 || old > t.capacity()) {
      atomicOr(&stage[0], kStatusLengthOutOfRange);
      old = next = 0;
    } else if (old > L) {
      atomicOr(&stage[1], kStatusKeepTooShort);
      next = old;
    }
    s.old_len[bh] = static_cast<int32_t>(old);
    s.new_len[bh] = static_cast<int32_t>(next);
  }
  if (threadIdx.x == 0) stage[2] = *bad_ids;
  __syncthreads();
  pg::plan_give_back<kThreadsPlan>(t, BH, s, stage, status, free0);
}

template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads) rows_kernel(
    scalar_t* __restrict__ key_pages,     // the pools (P, S, D) or the rectangle (B, H, C, D)
    scalar_t* __restrict__ value_pages,
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
  __shared__ int64_t src_k[kMaxChunk], src_v[kMaxChunk], dst_k[kMaxChunk], dst_v[kMaxChunk];  // element offsets
  __shared__ int item_s;
  if (threadIdx.x == 0) item_s = atomicAdd(ticket, 1);
  __syncthreads();
  if (*status != 0) return;  // uniform: when it returns, every block returns and nobody waits

  const int64_t item = item_s;  // = bh * nchunks + chunk, taken in ticket order
  const int64_t bh = item / p.nchunks, chunk = item - bh * p.nchunks;
  int64_t b, h;
  t.split(bh, b, h);
  const int CH = p.chunk_rows;
  const int64_t row0 = chunk * CH;
  const int64_t dst0 = offsets[item];
  const bool flag = chunk_flag(keep, p, b, h, row0 + threadIdx.x, s.old_len[bh]);
  int n = 0;
  const int pos = cuda::block_exclusive_count<kThreads>(flag, warp_counts, n);
  // Kept rows that are already in place (dst == src) lead the chunk's kept rows: only [stay, n) move.
  const int stay = __syncthreads_count(flag && dst0 + pos == row0 + threadIdx.x);
  if (flag && pos >= stay) {
    const int64_t src = row0 + threadIdx.x, dst = dst0 + pos;
    int64_t si, ss, di, ds;
    t.locate(src, si, ss);
    t.locate(dst, di, ds);
    const int64_t src_page = pg::page_after_give_back(t, s, *free0, bh, si);
    const int64_t dst_page = t.page(bh, di);  // dst < new length: still in the table
    src_k[pos - stay] = p.kp.at(src_page, ss);
    src_v[pos - stay] = p.vp.at(src_page, ss);
    dst_k[pos - stay] = p.kp.at(dst_page, ds);
    dst_v[pos - stay] = p.vp.at(dst_page, ds);
  }
  __syncthreads();

  const int moving = n - stay;
  scalar_t* ktile = reinterpret_cast<scalar_t*>(smem_tile);
  scalar_t* vtile = ktile + static_cast<int64_t>(CH) * p.D;
  const int units = p.units_per_row;
  for (int i = threadIdx.x; i < moving * units; i += kThreads) {
    const int r = i / units;
    const int col = (i - r * units) * kVec;
    cuda::copy_elems<scalar_t, kVec>(ktile + r * p.D + col, key_pages + src_k[r] + col);
    cuda::copy_elems<scalar_t, kVec>(vtile + r * p.D + col, value_pages + src_v[r] + col);
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
    cuda::copy_elems<scalar_t, kVec>(key_pages + dst_k[r] + col, ktile + r * p.D + col);
    cuda::copy_elems<scalar_t, kVec>(value_pages + dst_v[r] + col, vtile + r * p.D + col);
  }
}

// Rows too wide for a shared-memory chunk (a key and a value row beyond the opt-in limit): one block per head
// moves the kept rows down one at a time, in increasing order. Thread i always copies the same units (i,
// i + kThreads, ...) of every row, so each memory location is only ever touched by one thread and the in-place
// moves need no barrier between rows: a thread reads unit u of a source row before it writes unit u of any later
// destination.
template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads) wide_kernel(
    scalar_t* __restrict__ key_pages, scalar_t* __restrict__ value_pages,
    const pg::Tables t,                   // after the give-back
    const bool* __restrict__ keep,        // (B, H, L)
    const pg::HeadScratch s,
    const int32_t* __restrict__ status,   // (1) written by the plan
    const int32_t* __restrict__ free0,    // (1) free_count before the give-back
    const CompactParams p, int64_t units) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  __shared__ int warp_counts[kThreads / 32];
  __shared__ int src_rows[kThreads];
  if (*status != 0) return;
  const int64_t bh = blockIdx.x;
  int64_t b, h;
  t.split(bh, b, h);
  const int64_t live = s.old_len[bh], free_base = *free0;
  int64_t dst = 0;
  for (int64_t row0 = 0; row0 < live; row0 += kThreads) {
    const int64_t row = row0 + threadIdx.x;
    const bool flag = row < live && keep[b * p.keep_sb + h * p.keep_sh + row * p.keep_st];
    int n = 0;
    const int pos = cuda::block_exclusive_count<kThreads>(flag, warp_counts, n);  // also fences src_rows reuse
    if (flag) src_rows[pos] = static_cast<int>(threadIdx.x);
    __syncthreads();
    for (int r = 0; r < n; ++r) {
      const int64_t src = row0 + src_rows[r];
      if (src != dst) {  // else every row before it was kept: it stays
        int64_t si, ss, di, ds;
        t.locate(src, si, ss);
        t.locate(dst, di, ds);
        const int64_t sp = pg::page_after_give_back(t, s, free_base, bh, si), dp = t.page(bh, di);
        cuda::copy_row_units<scalar_t, kVec>(key_pages + p.kp.at(dp, ds), value_pages + p.vp.at(dp, ds),
                                             key_pages + p.kp.at(sp, ss), value_pages + p.vp.at(sp, ss), threadIdx.x,
                                             units, kThreads);
      }
      ++dst;
    }
  }
}

}  // namespace

void enqueue_compact_kv_cuda(const pg::Tables& t, Tensor& key_pages, Tensor& value_pages, const pg::Pool& key_pool,
                             const pg::Pool& value_pool, const Tensor& keep, const Tensor& scratch_like,
                             int32_t* status) {
  const int64_t BH = t.B * t.H, D = key_pages.size(-1), L = keep.size(2);
  const cudaStream_t stream = cuda::current_stream();

  // Chunk rows: as many row pairs (K and V) as fit the shared-memory budget, at most one per thread. Very wide
  // rows fall back to the opt-in shared-memory limit with fewer rows per chunk, and rows beyond even that to
  // wide_kernel (one block per head; the chunks then only size the counting).
  const int64_t pair_bytes = 2 * D * static_cast<int64_t>(key_pages.element_size());
  int64_t smem_limit = kSmemBudget;
  if (pair_bytes > smem_limit) {
    smem_limit = static_cast<int64_t>(cuda::device_facts().sharedMemPerBlockOptin) - 8192;
  }
  const bool wide = pair_bytes > smem_limit;
  const int64_t CH = pair_bytes > 0 && !wide ? std::min<int64_t>(kMaxChunk, smem_limit / pair_bytes) : kMaxChunk;
  const int64_t nchunks = cuda::ceil_div(std::min(t.capacity(), L), CH);
  const int64_t nitems = BH * nchunks;
  AG_CHECK(nitems <= std::numeric_limits<int32_t>::max(), "compaction: B * H * ceil(min(capacity, L) / ", CH,
           ") must fit in a CUDA grid, got ", nitems);

  // Scratch: [ticket][bad_ids][free0][read_done: nitems][chunk counts / offsets: nitems][heads: 4 * BH]; the
  // first 3 + nitems words zeroed.
  const Tensor scratch = empty_like_device({3 + 2 * nitems + 4 * BH}, kInt, scratch_like);
  int32_t* ticket = scratch.mutable_data_ptr<int32_t>();
  STD_CUDA_CHECK(cudaMemsetAsync(ticket, 0, (3 + nitems) * sizeof(int32_t), stream));
  int32_t* bad_ids = ticket + 1;
  int32_t* free0 = ticket + 2;
  int32_t* read_done = ticket + 3;
  int32_t* offsets = read_done + nitems;
  const pg::HeadScratch heads = pg::carve_heads(offsets + nitems, BH);

  CompactParams p;
  p.nchunks = nchunks;
  p.L = L;
  p.kp = key_pool;
  p.vp = value_pool;
  p.keep_sb = keep.stride(0), p.keep_sh = keep.stride(1), p.keep_st = keep.stride(2);
  p.chunk_rows = static_cast<int>(CH);
  p.D = static_cast<int>(std::min<int64_t>(D, std::numeric_limits<int32_t>::max()));  // the tile pitch (not wide)
  const bool* keep_ptr = keep.const_data_ptr<bool>();
  if (nitems > 0) {
    count_kernel<<<static_cast<unsigned>(nitems), kThreads, 0, stream>>>(t, keep_ptr, offsets, bad_ids, p);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
  plan_kernel<kPlanThreads><<<1, kPlanThreads, 0, stream>>>(t, offsets, bad_ids, heads, status, free0, BH, nchunks, L);
  STD_CUDA_KERNEL_LAUNCH_CHECK();

  if (nitems > 0 && D > 0) {
    const bool vec = rows_aligned_for(16, {&key_pages, &value_pages});
    ATTNGATE_DISPATCH_FLOATING_TYPES(key_pages.scalar_type(), "compact_kv_cuda", [&] {
      const int64_t units = vec ? D / (16 / static_cast<int64_t>(sizeof(scalar_t))) : D;
      if (wide) {
        auto kernel = vec ? wide_kernel<scalar_t, true> : wide_kernel<scalar_t, false>;
        kernel<<<static_cast<unsigned>(BH), kThreads, 0, stream>>>(key_pages.mutable_data_ptr<scalar_t>(),
                                                                   value_pages.mutable_data_ptr<scalar_t>(), t, keep_ptr,
                                                                   heads, status, free0, p, units);
        STD_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      p.units_per_row = static_cast<int>(units);
      const size_t smem = static_cast<size_t>(CH * pair_bytes);
      auto kernel = vec ? rows_kernel<scalar_t, true> : rows_kernel<scalar_t, false>;
      cuda::ensure_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
      kernel<<<static_cast<unsigned>(nitems), kThreads, smem, stream>>>(
          key_pages.mutable_data_ptr<scalar_t>(), value_pages.mutable_data_ptr<scalar_t>(), t, keep_ptr, offsets, heads,
          status, free0, ticket, read_done, p);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

namespace {

void paged_compact_kv_cuda(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                           Tensor& free_pages, Tensor& free_count, const Tensor& keep) {
  check_paged_compact_args(key_pages, value_pages, page_table, lengths, free_pages, free_count, keep);
  const cuda::DeviceGuard device_guard(key_pages);
  const Tensor scratch = cuda::make_status_scratch(key_pages, 0, 1);
  enqueue_compact_kv_cuda(pg::make_tables(key_pages, page_table, lengths, free_pages, free_count), key_pages,
                          value_pages, pg::make_pool(key_pages), pg::make_pool(value_pages), keep, key_pages,
                          scratch.mutable_data_ptr<int32_t>());
  cuda::check_status("paged_compact_kv_", scratch);
}

}  // namespace

ATTNGATE_IMPL(CUDA, paged_compact_kv_, paged_compact_kv_cuda);

}  // namespace attngate
