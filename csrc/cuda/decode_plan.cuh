// The work list of the CUDA decode attention kernels (cuda/paged_decode_attention.cu), sized on the device from
// every head's real length, and the merge of the pieces it splits heads into.
//
// A "head tile" hh = (b, KV head, tile of query heads of its GQA group) reads the row stream of its KV head: the
// head's cache rows, then its extra rows. The plan kernel (one block) splits each stream into equal chunks of at
// most ~chunk_rows rows, chunk_rows chosen so that all work comes to about kWaves items per resident block, and
// lists the items head tile by head tile. The decode kernel runs a persistent grid of exactly the resident blocks
// of the device (no partial last wave); each block takes the next item from an atomic counter until the list is
// done, so a long head is spread over many blocks while short heads take one item each. An item of a head tile
// with one chunk writes the final output; the others write a partial (running max, sum, unnormalised output) that
// decode_merge_kernel combines in item order (deterministic).
#pragma once
#include <cstdint>

#include "cuda/cuda_utils.cuh"
#include "kv_tables.h"

namespace attngate {
namespace decode {

constexpr int kPlanThreads = 1024;
constexpr int kMergeThreads = 128;
constexpr int kWaves = 2;              // items per resident block, on average
constexpr int64_t kMinChunkRows = 256;  // a chunk is worth its merge only above this many rows
constexpr int64_t kMaxChunks = 1024;    // chunks of one head tile (the merge stages their weights in shared memory)

// Scratch words of the plan, int32: [next item counter][items][prefix: head tiles + 1]; rows per item chunk are
// recomputed from the prefix by each item (see item_rows).
struct Plan {
  int32_t* counter;  // zeroed by the plan kernel, taken by the decode blocks
  int32_t* items;    // total items
  int32_t* prefix;   // (head tiles + 1): first item of each head tile
};

inline Plan carve_plan(int32_t* words) { return Plan{words, words + 1, words + 2}; }
inline int64_t plan_words(int64_t head_tiles) { return 3 + head_tiles; }

// Rows of head bh's stream: its cache rows (lengths[b, h], clamped to [0, capacity]; an invalid one is reported)
// plus the extra rows.
__device__ __forceinline__ int64_t stream_rows(const paged::Tables& t, int64_t bh, int64_t E) {
  const int64_t len = *t.length(bh);
  return (len < 0 ? 0 : (len > t.capacity() ? t.capacity() : len)) + E;
}

// One block of kPlanThreads threads: counts of every head tile's chunks, their exclusive prefix, the total; zeroes
// the item counter; reports lengths outside [0, capacity].
__global__ void __launch_bounds__(kPlanThreads) decode_plan_kernel(const paged::Tables t, int64_t E, int64_t ntiles,
                                                                   int64_t resident_blocks, int64_t tile_rows,
                                                                   Plan plan, int32_t* __restrict__ status) {
  __shared__ int64_t warp_sums[kPlanThreads / 32];
  __shared__ int64_t chunk_rows_s;
  const int64_t BH = t.B * t.H, tiles = BH * ntiles;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // 1. All rows, to size the chunks.
  int64_t rows = 0;
  bool bad = false;
  for (int64_t bh = threadIdx.x; bh < BH; bh += kPlanThreads) {
    const int64_t len = *t.length(bh);
    bad |= len < 0 || len > t.capacity();
    rows += stream_rows(t, bh, E);
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) atomicOr(status, kStatusLengthOutOfRange);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) rows += __shfl_xor_sync(cuda::kFullMask, rows, off);
  if (lane == 0) warp_sums[warp] = rows;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int w = 0; w < kPlanThreads / 32; ++w) total += warp_sums[w];
    total *= ntiles;  // every query tile of a KV head reads its stream
    const int64_t per_item = cuda::ceil_div(total, kWaves * (resident_blocks > 0 ? resident_blocks : 1));
    chunk_rows_s = cuda::round_up(per_item > kMinChunkRows ? per_item : kMinChunkRows, tile_rows);
    *plan.counter = 0;
  }
  __syncthreads();
  const int64_t chunk_rows = chunk_rows_s;
  // 2. Chunks per head tile, as an exclusive prefix over head tiles (in tiles of the block).
  int64_t carry = 0;
  for (int64_t base = 0; base < tiles; base += kPlanThreads) {
    const int64_t hh = base + threadIdx.x;
    int64_t c = 0;
    if (hh < tiles) {
      const int64_t n = stream_rows(t, hh / ntiles, E);
      c = n > chunk_rows ? cuda::ceil_div(n, chunk_rows) : 1;
      c = c < kMaxChunks ? c : kMaxChunks;
    }
    int64_t incl = c;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int64_t up = __shfl_up_sync(cuda::kFullMask, incl, off);
      incl += lane >= off ? up : 0;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    int64_t before = 0, tile_total = 0;
    for (int w = 0; w < kPlanThreads / 32; ++w) {
      before += w < warp ? warp_sums[w] : 0;
      tile_total += warp_sums[w];
    }
    if (hh < tiles) plan.prefix[hh] = static_cast<int32_t>(carry + before + incl - c);
    carry += tile_total;
    __syncthreads();  // warp_sums is rewritten by the next tile
  }
  if (threadIdx.x == 0) {
    plan.prefix[tiles] = static_cast<int32_t>(carry);
    *plan.items = static_cast<int32_t>(carry);
  }
}

// The head tile of item `item` (the last hh with prefix[hh] <= item).
__device__ __forceinline__ int64_t item_head_tile(const int32_t* prefix, int64_t tiles, int64_t item) {
  int64_t lo = 0, hi = tiles;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (prefix[mid] <= item) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Rows [begin, end) of chunk `chunk` out of `chunks` of an n-row stream: equal chunks, rounded up to whole tiles.
__device__ __forceinline__ void item_rows(int64_t n, int64_t chunks, int64_t chunk, int64_t tile_rows, int64_t& begin,
                                          int64_t& end) {
  const int64_t rows = cuda::round_up(cuda::ceil_div(n, chunks), tile_rows);
  begin = chunk * rows;
  end = begin + rows < n ? begin + rows : n;
}

// Combines the items of one (batch, query head) whose head tile has several: out = sum_i 2^(m_i - M) o_i /
// sum_i 2^(m_i - M) l_i (running maxima in log2 units). Partials are indexed by (item, query head g of the tile):
// part_ml[item * gt + g], part_out[(item * gt + g) * D + d].
template <typename scalar_t>
__global__ void __launch_bounds__(kMergeThreads) decode_merge_kernel(
    const float2* __restrict__ part_ml, const float* __restrict__ part_out, scalar_t* __restrict__ out,  // (B*Hq, D)
    const int32_t* __restrict__ prefix, int64_t Hq, int64_t H, int64_t group, int64_t ntiles, int gt, int64_t D) {
  __shared__ float weight_s[kMaxChunks];
  __shared__ float red_s[kMergeThreads / 32];
  __shared__ float inv_l_s;
  const int64_t row = blockIdx.x;  // b * Hq + query head
  const int64_t b = row / Hq, qh = row - b * Hq, h = qh / group, in_group = qh - h * group;
  const int64_t hh = (b * H + h) * ntiles + in_group / gt, g = in_group % gt;
  const int64_t first = prefix[hh], n = prefix[hh + 1] - first;  // n <= kMaxChunks (the plan caps it)
  if (n <= 1) return;  // the item wrote the output itself
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < n; i += kMergeThreads) m = fmaxf(m, part_ml[(first + i) * gt + g].x);
  m = cuda::warp_max(m);
  if (lane == 0) red_s[warp] = m;
  __syncthreads();
  m = red_s[0];
  for (int w = 1; w < kMergeThreads / 32; ++w) m = fmaxf(m, red_s[w]);
  __syncthreads();  // red_s is reused for the sum
  float l = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kMergeThreads) {
    const float2 v = part_ml[(first + i) * gt + g];
    const float w = v.x == -INFINITY ? 0.f : exp2f(v.x - m);  // empty pieces weigh nothing
    weight_s[i] = w;
    l += w * v.y;
  }
  l = cuda::warp_sum(l);
  if (lane == 0) red_s[warp] = l;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kMergeThreads / 32; ++w) total += red_s[w];  // fixed order: deterministic
    inv_l_s = total > 0.f ? 1.f / total : 0.f;  // a head with no visible row gives zeros
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < D; d += kMergeThreads) {
    float acc = 0.f;
    for (int64_t i = 0; i < n; ++i) acc += weight_s[i] * part_out[((first + i) * gt + g) * D + d];
    out[row * D + d] = static_cast<scalar_t>(acc * inv_l_s);
  }
}

}  // namespace decode
}  // namespace attngate
