// compact_kv_: stable in-place compaction of each (batch, KV head)'s live rows, with no second cache buffer.
//
//   1. count_kept_kernel    kept live rows of every (head, chunk of S rows)
//   2. plan_lengths_kernel  one block: per-chunk destination prefixes, validation, all-or-nothing new lengths
//   3. compact_rows_kernel  one block per (head, chunk), see below
//
// Rows before the first dropped row of a head never move (the CPU kernel skips them too): a block copies only
// the kept rows of its chunk that move, and a chunk whose kept rows all stay (keep-all heads, the untouched
// prefix of a head) reads and writes no row at all. A stationary row is never a destination of another block
// (every later destination lies above it), so skipping it needs no synchronisation.
//
// Why several blocks per head: with few heads (B = 1, H = 8, a 32k-row prefill) one block per head would move the
// cache at a small fraction of the bandwidth. Chunks of one head therefore run in parallel, and the in-place
// moves stay race-free by these rules:
//   * A kept row only moves down: its destination (kept rows before it) is <= its source index. So chunk k only
//     writes rows < (k + 1) * S, i.e. into its own source range and those of lower chunks, never into higher.
//   * Each block first copies its chunk's moving rows into shared memory, then publishes a per-chunk "read done"
//     flag (__threadfence + atomic). Its own rows are covered by the __syncthreads between reading and writing.
//   * Before writing, a block waits for the read-done flags of the (at most two) lower chunks whose source range
//     its destination range [dst, dst + n) overlaps. Nobody else writes into chunk j's range before it was read.
//   * Blocks take their (head, chunk) work item from an atomic ticket counter, in increasing order. A block
//     only waits for lower tickets, whose blocks are therefore already resident, and the read phase itself
//     never waits, so every awaited flag is eventually published: no deadlock, whatever the block scheduling.
// The ticket counter and flags are zeroed by an async memset on the current stream (graph capturable).
#include <algorithm>
#include <limits>

#include "checks.h"
#include "cuda/stable_cuda.cuh"
#include "cuda_utils.cuh"
#include "dispatch.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxChunk = kThreads;          // one keep flag per thread
constexpr int64_t kSmemBudget = 46 * 1024;   // dynamic smem per block: 4 blocks per SM on A100/H100/H200

struct CompactParams {
  int64_t H, nchunks;
  int64_t kc_sb, kc_sh, kc_sc;  // key_cache strides
  int64_t vc_sb, vc_sh, vc_sc;  // value_cache strides
  int64_t keep_sb, keep_sh, keep_st;
  int chunk_rows;               // S
  int units_per_row;            // D / vector width
  int D;                        // row pitch of the shared-memory tile, in elements
};

template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads) compact_rows_kernel(
    scalar_t* __restrict__ key_cache,      // (B, H, C, D)
    scalar_t* __restrict__ value_cache,    // (B, H, C, D)
    const bool* __restrict__ keep,         // (B, H, L)
    const int32_t* __restrict__ offsets,   // (B * H, nchunks) kept rows of the head before each chunk
    const int32_t* __restrict__ old_len,   // (B * H) live rows before compaction
    const int32_t* __restrict__ status,    // (1) written by plan_lengths_kernel
    int32_t* __restrict__ ticket,          // (1) zeroed
    int32_t* __restrict__ read_done,       // (B * H * nchunks) zeroed
    const CompactParams p) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  extern __shared__ uint4 smem_tile[];  // S kept K rows, then S kept V rows, D elements each
  __shared__ int warp_counts[kThreads / 32];
  __shared__ int src_rows[kMaxChunk];
  __shared__ int item_s;
  if (threadIdx.x == 0) item_s = atomicAdd(ticket, 1);
  __syncthreads();
  if (*status != 0) return;  // uniform: when it returns, every block returns and nobody waits

  const int64_t item = item_s;  // = bh * nchunks + chunk, taken in ticket order
  const int64_t bh = item / p.nchunks, chunk = item % p.nchunks;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int S = p.chunk_rows;
  const int64_t row0 = chunk * S;
  const int64_t row = row0 + threadIdx.x;
  const int64_t dst0 = offsets[item];  // kept rows of the head before this chunk, <= row0
  const bool flag = static_cast<int>(threadIdx.x) < S && row < old_len[bh] &&
                    keep[b * p.keep_sb + h * p.keep_sh + row * p.keep_st];
  int n = 0;
  const int pos = cuda::block_exclusive_count<kThreads>(flag, warp_counts, n);
  if (flag) src_rows[pos] = static_cast<int>(threadIdx.x);
  // A kept row stays where it is iff every row of the head before it is kept (dst0 == row0 and all earlier rows
  // of the chunk kept, i.e. pos == threadIdx.x). Those rows form a prefix [0, stay) of the chunk's kept rows;
  // no other block writes into them (every later destination is >= row0 + stay), so they are neither read nor
  // written. Only rows [stay, n) move.
  const int stay = __syncthreads_count(flag && dst0 == row0 && pos == static_cast<int>(threadIdx.x));

  scalar_t* ktile = reinterpret_cast<scalar_t*>(smem_tile);
  scalar_t* vtile = ktile + static_cast<int64_t>(S) * p.D;
  scalar_t* kbase = key_cache + b * p.kc_sb + h * p.kc_sh;
  scalar_t* vbase = value_cache + b * p.vc_sb + h * p.vc_sh;
  const int units = p.units_per_row;
  const int moving = n - stay;
  for (int i = threadIdx.x; i < moving * units; i += kThreads) {
    const int r = i / units;
    const int col = (i - r * units) * kVec;
    const int64_t src = row0 + src_rows[stay + r];
    cuda::copy_elems<scalar_t, kVec>(ktile + r * p.D + col, kbase + src * p.kc_sc + col);
    cuda::copy_elems<scalar_t, kVec>(vtile + r * p.D + col, vbase + src * p.vc_sc + col);
  }
  __syncthreads();  // every moving source row of this chunk is now in shared memory
  if (threadIdx.x == 0) {
    __threadfence();
    atomicExch(read_done + item, 1);
  }
  if (moving == 0) return;  // uniform: nothing of this chunk moves

  const int64_t first_dst = dst0 + stay;  // destinations [first_dst, dst0 + n) of the moving rows
  const int64_t first = first_dst / S;
  const int64_t last = std::min<int64_t>((dst0 + n - 1) / S, chunk - 1);
  cuda::wait_for_chunks_read(read_done + bh * p.nchunks, first, last);

  for (int i = threadIdx.x; i < moving * units; i += kThreads) {
    const int r = i / units;
    const int col = (i - r * units) * kVec;
    const int64_t dst = first_dst + r;
    cuda::copy_elems<scalar_t, kVec>(kbase + dst * p.kc_sc + col, ktile + r * p.D + col);
    cuda::copy_elems<scalar_t, kVec>(vbase + dst * p.vc_sc + col, vtile + r * p.D + col);
  }
}

// Rows too wide for a shared-memory chunk (a key and a value row beyond the opt-in limit): one block per head
// moves the kept rows down one at a time, in increasing order, like the CPU kernel. Thread i always copies the
// same units (i, i + kThreads, ...) of every row, so each memory location is only ever touched by one thread and
// the in-place moves need no barrier between rows: a thread reads unit u of a source row before it writes unit u
// of any later destination.
template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads) compact_wide_kernel(
    scalar_t* __restrict__ key_cache,     // (B, H, C, D)
    scalar_t* __restrict__ value_cache,   // (B, H, C, D)
    const bool* __restrict__ keep,        // (B, H, L)
    const int32_t* __restrict__ old_len,  // (B * H) live rows before compaction
    const int32_t* __restrict__ status,   // (1) written by plan_lengths_kernel
    const CompactParams p, int64_t units) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  __shared__ int warp_counts[kThreads / 32];
  __shared__ int src_rows[kThreads];
  if (*status != 0) return;
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.H, h = bh % p.H;
  scalar_t* kbase = key_cache + b * p.kc_sb + h * p.kc_sh;
  scalar_t* vbase = value_cache + b * p.vc_sb + h * p.vc_sh;
  const int64_t live = old_len[bh];
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
        scalar_t* kd = kbase + dst * p.kc_sc;
        scalar_t* vd = vbase + dst * p.vc_sc;
        const scalar_t* ks = kbase + src * p.kc_sc;
        const scalar_t* vs = vbase + src * p.vc_sc;
#pragma unroll 1
        for (int64_t u = threadIdx.x; u < units; u += kThreads) {
          cuda::copy_elems<scalar_t, kVec>(kd + u * kVec, ks + u * kVec);
          cuda::copy_elems<scalar_t, kVec>(vd + u * kVec, vs + u * kVec);
        }
      }
      ++dst;
    }
  }
}

}  // namespace

void compact_kv_cuda(Tensor& key_cache, Tensor& value_cache, Tensor& lengths, const Tensor& keep) {
  check_compact_kv_args(key_cache, value_cache, lengths, keep);
  const int64_t B = key_cache.size(0), H = key_cache.size(1), C = key_cache.size(2), D = key_cache.size(3);
  const int64_t L = keep.size(2);
  const int64_t BH = B * H;
  if (BH == 0) return;

  const cuda::DeviceGuard device_guard(key_cache);
  const cudaStream_t stream = cuda::current_stream();

  // Chunk rows S: as many row pairs (K and V) as fit the shared-memory budget, at most one per thread. Very wide
  // rows fall back to the opt-in shared-memory limit with fewer rows per chunk, and rows beyond even that to
  // compact_wide_kernel (one block per head; S then only sizes the counting chunks).
  const int64_t pair_bytes = 2 * D * static_cast<int64_t>(key_cache.element_size());
  int64_t smem_limit = kSmemBudget;
  if (pair_bytes > smem_limit) {
    smem_limit = static_cast<int64_t>(cuda::device_facts().sharedMemPerBlockOptin) - 2048;
  }
  const bool wide = pair_bytes > smem_limit;
  const int64_t S = pair_bytes > 0 && !wide ? std::min<int64_t>(kMaxChunk, smem_limit / pair_bytes) : kMaxChunk;
  const int64_t nchunks = cuda::ceil_div(std::min(C, L), S);
  const int64_t nitems = BH * nchunks;
  AG_CHECK(nitems <= std::numeric_limits<int32_t>::max(), "compact_kv_: B * H * ceil(min(C, L) / ", S,
           ") must fit in a CUDA grid, got ", nitems);

  // Scratch: [status][ticket][read_done: nitems][old_len: BH][new_len: BH][chunk counts / offsets: nitems].
  const Tensor scratch = cuda::make_status_scratch(key_cache, 1 + 2 * nitems + 2 * BH, 2 + nitems);
  int32_t* status = scratch.mutable_data_ptr<int32_t>();
  int32_t* ticket = status + 1;
  int32_t* read_done = ticket + 1;
  int32_t* old_len = read_done + nitems;
  int32_t* new_len = old_len + BH;
  int32_t* offsets = new_len + BH;

  int32_t* len_ptr = lengths.mutable_data_ptr<int32_t>();
  if (nitems > 0) {
    cuda::count_kept_kernel<kThreads><<<static_cast<unsigned>(nitems), kThreads, 0, stream>>>(
        keep.mutable_data_ptr<bool>(), len_ptr, offsets, H, keep.stride(0), keep.stride(1), keep.stride(2),
        lengths.stride(0), lengths.stride(1), nchunks, static_cast<int>(S), std::min(C, L));
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int plan_threads = static_cast<int>(std::min<int64_t>(cuda::kPlanThreads, BH * 32));
  cuda::plan_lengths_kernel<false><<<1, plan_threads, 0, stream>>>(
      len_ptr, offsets, old_len, new_len, status, BH, H, lengths.stride(0), lengths.stride(1), nchunks, /*rows=*/0, C,
      L);
  STD_CUDA_KERNEL_LAUNCH_CHECK();

  if (nitems > 0 && D > 0) {
    const bool vec = rows_aligned_for(16, {&key_cache, &value_cache});
    ATTNGATE_DISPATCH_FLOATING_TYPES(key_cache.scalar_type(), "compact_kv_cuda", [&] {
      CompactParams p;
      p.H = H;
      p.nchunks = nchunks;
      p.kc_sb = key_cache.stride(0), p.kc_sh = key_cache.stride(1), p.kc_sc = key_cache.stride(2);
      p.vc_sb = value_cache.stride(0), p.vc_sh = value_cache.stride(1), p.vc_sc = value_cache.stride(2);
      p.keep_sb = keep.stride(0), p.keep_sh = keep.stride(1), p.keep_st = keep.stride(2);
      p.chunk_rows = static_cast<int>(S);
      const int64_t units = vec ? D / (16 / static_cast<int64_t>(sizeof(scalar_t))) : D;
      if (wide) {
        auto kernel = vec ? compact_wide_kernel<scalar_t, true> : compact_wide_kernel<scalar_t, false>;
        kernel<<<static_cast<unsigned>(BH), kThreads, 0, stream>>>(
            key_cache.mutable_data_ptr<scalar_t>(), value_cache.mutable_data_ptr<scalar_t>(),
            keep.mutable_data_ptr<bool>(), old_len, status, p, units);
        STD_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      p.D = static_cast<int>(D);  // S * D * 2 elements fit in shared memory, so D fits in int
      p.units_per_row = static_cast<int>(units);
      const size_t smem = static_cast<size_t>(S * pair_bytes);
      auto kernel = vec ? compact_rows_kernel<scalar_t, true> : compact_rows_kernel<scalar_t, false>;
      if (smem > 48 * 1024) {
        STD_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      }
      kernel<<<static_cast<unsigned>(nitems), kThreads, smem, stream>>>(
          key_cache.mutable_data_ptr<scalar_t>(), value_cache.mutable_data_ptr<scalar_t>(),
          keep.mutable_data_ptr<bool>(), offsets, old_len, status, ticket, read_done, p);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  cuda::check_status("compact_kv_", scratch);
}

ATTNGATE_IMPL(CUDA, compact_kv_, compact_kv_cuda);

}  // namespace attngate
