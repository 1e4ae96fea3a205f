// Device pieces of the CUDA storage kernels (append, compaction, row removal) of both cache layouts
// (csrc/kv_tables.h): the single-block plans that validate a whole call before anything is written and then take
// pages from / give pages back to the free stack in the reference's order (attngate_ext/ops/paged_reference.py),
// one thread per head, and the scans they need. A rectangle cache owns its pages: its plans only check and move
// lengths.
//
// Value errors are evaluated in the reference's stages: [0] lengths / free_count, [1] page table full (append)
// or keep too short / bad rows, [2] out of pages (append) or bad page ids, [3] bad page ids (append) or free-stack
// overflow. The status word is the first non-empty stage, so CPU and CUDA raise the same error for the same input.
#pragma once
#include <cstdint>

#include "cuda/cuda_utils.cuh"
#include "kv_tables.h"

namespace attngate {
namespace cuda {
namespace paged {

constexpr int kStages = 4;

using ::attngate::paged::make_pool;
using ::attngate::paged::make_rect_pool;
using ::attngate::paged::make_rect_tables;
using ::attngate::paged::make_tables;
using ::attngate::paged::pages_for;
using ::attngate::paged::Pool;
using ::attngate::paged::Tables;

// Turns one head's kept-row counts per chunk, `counts[0..n)`, into their exclusive prefixes in place (the rows kept
// before each chunk) and returns the head's total: the offsets the append and compaction kernels write chunks at.
__device__ __forceinline__ int64_t exclusive_chunk_prefix(int32_t* counts, int64_t n) {
  int64_t total = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int32_t kept = counts[j];
    counts[j] = static_cast<int32_t>(total);
    total += kept;
  }
  return total;
}

// Per-head scratch of the plans, int32 [B * H] each: rows before and after the op, pages taken or given back, and
// the exclusive prefix of the latter over heads in (b, h) order.
struct HeadScratch {
  int32_t* old_len;
  int32_t* new_len;
  int32_t* count;
  int32_t* before;
};

// Carves [old_len][new_len][count][before] (4 * BH words) out of `words`.
inline HeadScratch carve_heads(int32_t* words, int64_t BH) {
  return HeadScratch{words, words + BH, words + 2 * BH, words + 3 * BH};
}

// All 32 lanes of a warp: the sum of v over lanes [0, lane].
template <typename T>
__device__ __forceinline__ T warp_inclusive_sum(T v, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const T up = __shfl_up_sync(kFullMask, v, off);
    v += lane >= off ? up : T(0);
  }
  return v;
}

// One whole block of kThreads: out[i] = in[0] + ... + in[i - 1] for i < n (global memory, in != out); returns
// the total to every thread. Prefixes are stored as int32: they are only used when the total was validated
// against the free stack (< 2^31).
template <int kThreads>
__device__ int64_t block_exclusive_scan(const int32_t* in, int32_t* out, int64_t n) {
  __shared__ int64_t warp_sums[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t carry = 0;
  for (int64_t base = 0; base < n; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < n ? in[i] : 0;
    const int64_t incl = warp_inclusive_sum(v, lane);
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    int64_t before = 0, tile = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) {
      const int64_t c = warp_sums[w];
      before += w < warp ? c : 0;
      tile += c;
    }
    if (i < n) out[i] = static_cast<int32_t>(carry + before + incl - v);
    carry += tile;
    __syncthreads();  // warp_sums is rewritten by the next tile
  }
  return carry;
}

// The head whose range [before[bh], before[bh + 1]) of a flattened per-head list holds item c (before: exclusive
// prefixes of BH counts, c < their total): the last head with before[bh] <= c.
__device__ __forceinline__ int64_t head_of(const int32_t* before, int64_t BH, int64_t c) {
  int64_t lo = 0, hi = BH;  // before[lo] <= c < before[hi] (before[BH] = total)
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (before[mid] <= c) lo = mid;
    else hi = mid;
  }
  return lo;
}

// The status of a call: the first non-empty stage (see the top of this file).
__device__ __forceinline__ int first_stage(const int* stage) {
  int s = 0;
#pragma unroll
  for (int i = kStages - 1; i >= 0; --i) s = stage[i] != 0 ? stage[i] : s;
  return s;
}

// Append plan, run by one whole block of kThreads, one thread per head. kept(bh) returns the head's kept new rows
// (the calling thread's loads). Validates every head (stages: lengths / free_count, page table full, out of pages,
// ids of the partly filled last pages and of the pages popped), writes the status word, and only when it is 0:
// pops the new pages into the page table (head by head in (b, h) order, the topmost first; one thread per page),
// writes lengths and free_count. Returns whether it wrote. Afterwards s.old_len holds the lengths before the
// append. With `gated`, a status word already set by an earlier kernel of the same call stops the plan first.
template <int kThreads, typename KeptFn>
__device__ bool plan_take(const Tables& t, int64_t BH, const KeptFn& kept, const HeadScratch& s, int32_t* status,
                          bool gated) {
  if (gated && *status != 0) return false;  // uniform: every thread reads the same word
  __shared__ int stage[kStages];
  __shared__ int64_t free_s;
  const bool owns = t.owns_pages();
  if (threadIdx.x < kStages) stage[threadIdx.x] = 0;
  if (threadIdx.x == 0) free_s = owns ? 0 : *t.free_count;
  __syncthreads();
  if (threadIdx.x == 0 && (free_s < 0 || free_s > t.P)) atomicOr(&stage[0], kStatusFreeCountOutOfRange);
  for (int64_t bh = threadIdx.x; bh < BH; bh += kThreads) {
    const int64_t n_kept = kept(bh);
    int64_t old = *t.length(bh), next = 0, need = 0;
    if (old < 0 || old > t.capacity()) {
      atomicOr(&stage[0], kStatusLengthOutOfRange);
      old = 0;
    } else {
      next = old + n_kept;
      const int64_t pages = pages_for(next, t.S);
      if (pages > t.M) atomicOr(&stage[1], kStatusPageTableFull);
      else if (!owns) need = pages - pages_for(old, t.S);
      // The partly filled last page is written too.
      if (!owns && next > old && old % t.S != 0 && !t.id_ok(*t.entry(bh, old / t.S))) {
        atomicOr(&stage[3], kStatusBadPageId);
      }
    }
    s.old_len[bh] = static_cast<int32_t>(old);
    s.new_len[bh] = static_cast<int32_t>(next);
    s.count[bh] = static_cast<int32_t>(need);
  }
  __syncthreads();
  const int64_t total = block_exclusive_scan<kThreads>(s.count, s.before, BH);
  const int64_t free = free_s;
  if (stage[0] == 0 && stage[1] == 0) {  // free_count and every need are valid here
    if (total > free) {
      if (threadIdx.x == 0) stage[2] = kStatusOutOfPages;
    } else {
      for (int64_t c = threadIdx.x; c < total; c += kThreads) {
        if (!t.id_ok(*t.free_at(free - 1 - c))) atomicOr(&stage[3], kStatusBadPageId);
      }
    }
  }
  __syncthreads();
  const int bits = first_stage(stage);
  if (threadIdx.x == 0) *status = bits;
  if (bits != 0) return false;
  // Pop c (in (b, h) order, each head's pages in table order) takes the c-th page from the top of the stack.
  for (int64_t c = threadIdx.x; c < total; c += kThreads) {
    const int64_t bh = head_of(s.before, BH, c);
    *t.entry(bh, pages_for(s.old_len[bh], t.S) + (c - s.before[bh])) = *t.free_at(free - 1 - c);
  }
  for (int64_t bh = threadIdx.x; bh < BH; bh += kThreads) *t.length(bh) = s.new_len[bh];
  if (threadIdx.x == 0 && !owns) *t.free_count = static_cast<int32_t>(free - total);
  return true;
}

// Give-back plan of compaction and removal, run by one whole block of kThreads once s.old_len / s.new_len hold
// every head's rows before and after and `stage` (shared, kStages) holds the per-head stages already found.
// Checks free_count and the free-stack overflow, writes the status word, and only when it is 0: pushes the pages
// [ceil(new / S), ceil(old / S)) of every head (head by head, in page order; one thread per page) onto the free
// stack, sets their table entries to -1, writes lengths and free_count, and stores the old free_count in *free0
// (the copy kernels find the pages given back there, see page_after_give_back). A rectangle only writes lengths.
template <int kThreads>
__device__ void plan_give_back(const Tables& t, int64_t BH, const HeadScratch& s, int* stage, int32_t* status,
                               int32_t* free0) {
  __shared__ int64_t free_s;
  const bool owns = t.owns_pages();
  if (threadIdx.x == 0) {
    free_s = owns ? 0 : *t.free_count;
    if (free_s < 0 || free_s > t.P) atomicOr(&stage[0], kStatusFreeCountOutOfRange);
  }
  for (int64_t bh = threadIdx.x; bh < BH; bh += kThreads) {
    s.count[bh] = owns ? 0 : static_cast<int32_t>(pages_for(s.old_len[bh], t.S) - pages_for(s.new_len[bh], t.S));
  }
  __syncthreads();
  const int64_t total = block_exclusive_scan<kThreads>(s.count, s.before, BH);
  const int64_t free = free_s;
  if (threadIdx.x == 0 && stage[0] == 0 && stage[1] == 0 && stage[2] == 0 && free + total > t.P) {
    stage[3] = kStatusFreeCountOutOfRange;
  }
  __syncthreads();
  const int bits = first_stage(stage);
  if (threadIdx.x == 0) *status = bits;
  if (bits != 0) return;
  for (int64_t c = threadIdx.x; c < total; c += kThreads) {
    const int64_t bh = head_of(s.before, BH, c);
    int32_t* entry = t.entry(bh, pages_for(s.new_len[bh], t.S) + (c - s.before[bh]));
    *t.free_at(free + c) = *entry;
    *entry = -1;
  }
  for (int64_t bh = threadIdx.x; bh < BH; bh += kThreads) *t.length(bh) = s.new_len[bh];
  if (threadIdx.x == 0) {
    if (!owns) *t.free_count = static_cast<int32_t>(free + total);
    *free0 = static_cast<int32_t>(free);
  }
}

// The page holding logical row block `page_index` of head bh after plan_give_back ran: still in the table below
// the new length, else on the free stack where the plan pushed it (a rectangle: its own page).
__device__ __forceinline__ int64_t page_after_give_back(const Tables& t, const HeadScratch& s, int64_t free0,
                                                        int64_t bh, int64_t page_index) {
  if (t.owns_pages()) return bh;
  const int64_t kept_pages = pages_for(s.new_len[bh], t.S);
  return page_index < kept_pages ? *t.entry(bh, page_index)
                                 : *t.free_at(free0 + s.before[bh] + (page_index - kept_pages));
}

}  // namespace paged
}  // namespace cuda
}  // namespace attngate
