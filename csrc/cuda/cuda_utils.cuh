// Device helpers shared by the attngate CUDA kernels: 16-byte row packs, float conversion, warp and block
// reductions, the chunk counts of the storage kernels, and the status-word scratch with its optional host
// read-back.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "checks.h"
#include "cuda/stable_cuda.cuh"
#include "stable_api.h"

namespace attngate {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Elements of T in one 16-byte vector access; the scalar fallback uses 1.
template <typename T, bool kVector>
constexpr int vec_elems() {
  return kVector ? static_cast<int>(16 / sizeof(T)) : 1;
}

// 16 bytes of T. Loads go through uint4 so that the access is a single 128-bit instruction; the memcpy into the
// pack is resolved to register moves.
template <typename T>
struct alignas(16) Pack16 {
  T v[16 / sizeof(T)];
};

// Reads kN consecutive elements at p (16-byte aligned when kN > 1) as float.
template <typename T, int kN>
__device__ __forceinline__ void load_as_float(const T* p, float (&out)[kN]) {
  if constexpr (kN == 1) {
    out[0] = static_cast<float>(p[0]);
  } else {
    static_assert(kN * sizeof(T) == 16, "vector loads are 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    Pack16<T> pk;
    memcpy(&pk, &raw, 16);
#pragma unroll
    for (int i = 0; i < kN; ++i) out[i] = static_cast<float>(pk.v[i]);
  }
}

// One raw 16-byte vector at p (16-byte aligned), or zeros (which read as 0.0 in every dtype) when !ok.
__device__ __forceinline__ uint4 load_raw16(const void* p, bool ok) {
  return ok ? *reinterpret_cast<const uint4*>(p) : make_uint4(0u, 0u, 0u, 0u);
}

// Elements [first, first + 4) of a raw 16-byte vector of T as float. Converting four at a time keeps register
// pressure down in loops that hold several raw vectors.
template <typename T>
__device__ __forceinline__ void unpack4_as_float(const uint4& raw, int first, float (&out)[4]) {
  Pack16<T> pk;
  memcpy(&pk, &raw, 16);
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = static_cast<float>(pk.v[first + i]);
}

// Writes kN floats at p (16-byte aligned when kN > 1) as T.
template <typename T, int kN>
__device__ __forceinline__ void store_from_float(T* p, const float (&in)[kN]) {
  if constexpr (kN == 1) {
    p[0] = static_cast<T>(in[0]);
  } else {
    static_assert(kN * sizeof(T) == 16, "vector stores are 16 bytes");
    Pack16<T> pk;
#pragma unroll
    for (int i = 0; i < kN; ++i) pk.v[i] = static_cast<T>(in[i]);
    uint4 raw;
    memcpy(&raw, &pk, 16);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// Copies kN elements (one 16-byte vector when kN > 1) without converting them.
template <typename T, int kN>
__device__ __forceinline__ void copy_elems(T* __restrict__ dst, const T* __restrict__ src) {
  if constexpr (kN == 1) {
    dst[0] = src[0];
  } else {
    static_assert(kN * sizeof(T) == 16, "vector copies are 16 bytes");
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  }
}

// In-place compaction across blocks: block (bh, chunk) may write rows only once every lower chunk whose source rows
// those destinations overlap has read them. Thread t of the block waits for the flag of chunk first + t (one thread
// per chunk in [first, last]: the destinations of one chunk's rows span at most two chunks), then the block syncs.
__device__ __forceinline__ void wait_for_chunks_read(const int32_t* chunk_flags, int64_t first, int64_t last) {
  const int64_t wait_chunk = first + threadIdx.x;
  if (wait_chunk <= last) {
    const volatile int32_t* done = chunk_flags + wait_chunk;
    while (*done == 0) __nanosleep(64);
    __threadfence();
  }
  __syncthreads();
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Sums kN per-lane values across the warp with kN - 1 + log2(32 / kN) shuffles instead of 5 * kN: afterwards
// lane l holds the full sum of v[l / (32 / kN)] in v[0]. kN is a power of two <= 32, kStride starts at 16.
template <int kN, int kStride = 16>
__device__ __forceinline__ void warp_transpose_sum(float* v, int lane) {
  if constexpr (kStride > 0) {
    if constexpr (kN > 1) {
      const bool upper = (lane & kStride) != 0;
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) {
        const float send = upper ? v[i] : v[i + kN / 2];
        const float keep = upper ? v[i + kN / 2] : v[i];
        v[i] = keep + __shfl_xor_sync(kFullMask, send, kStride);
      }
      warp_transpose_sum<kN / 2, kStride / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(kFullMask, v[0], kStride);
      warp_transpose_sum<1, kStride / 2>(v, lane);
    }
  }
}

// Exclusive prefix count of `flag` over a block of kThreads threads (all must call it). Returns this thread's
// position among the flagged threads and sets `total`. `warp_counts` is shared memory of kThreads / 32 ints.
template <int kThreads>
__device__ __forceinline__ int block_exclusive_count(bool flag, int* warp_counts, int& total) {
  static_assert(kThreads % 32 == 0, "whole warps");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(kFullMask, flag);
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    const int c = warp_counts[w];
    before += w < warp ? c : 0;
    sum += c;
  }
  total = sum;
  __syncthreads();  // warp_counts may be reused right after
  return before + __popc(ballot & ((1u << lane) - 1u));
}

// ---- Chunk counts of the storage kernels -----------------------------------------------------------------


// Kept rows of each (head, chunk): rows [chunk * chunk_rows, min(+chunk_rows, limit)) of keep, where limit is
// rows_limit, or lengths[b, h] clamped to [0, rows_limit] when lengths is given (an invalid length only has to
// keep the reads in bounds: the plan kernel reports it and nothing is written).
template <int kThreads>
__global__ void __launch_bounds__(kThreads) count_kept_kernel(
    const bool* __restrict__ keep,        // (B, H, >= rows_limit), strides keep_sb, keep_sh, keep_st
    const int32_t* __restrict__ lengths,  // (B, H), strides len_sb, len_sh; null: every head has rows_limit rows
    int32_t* __restrict__ counts,         // (B * H, nchunks)
    int64_t H, int64_t keep_sb, int64_t keep_sh, int64_t keep_st, int64_t len_sb, int64_t len_sh,
    int64_t nchunks, int chunk_rows, int64_t rows_limit) {
  const int64_t item = blockIdx.x;  // = bh * nchunks + chunk
  const int64_t bh = item / nchunks;
  const int64_t b = bh / H, h = bh % H;
  int64_t limit = rows_limit;
  if (lengths != nullptr) {
    const int64_t len = lengths[b * len_sb + h * len_sh];
    limit = len < 0 ? 0 : (len < rows_limit ? len : rows_limit);
  }
  const int64_t row = (item % nchunks) * chunk_rows + threadIdx.x;
  const bool flag = static_cast<int>(threadIdx.x) < chunk_rows && row < limit &&
                    keep[b * keep_sb + h * keep_sh + row * keep_st];
  const int n = __syncthreads_count(flag);
  if (threadIdx.x == 0) counts[item] = n;
}

// ---- Status word -----------------------------------------------------------------------------------------

// An int32 scratch buffer on the current stream: word 0 is the status word that kernels OR StatusBits into,
// words [1, 1 + extra_words) are free for the caller. The first `zeroed_words` words are cleared with an async
// memset on the current stream, so the op stays CUDA-graph capturable.
inline Tensor make_status_scratch(const Tensor& like, int64_t extra_words, int64_t zeroed_words) {
  Tensor scratch = empty_like_device({1 + extra_words}, kInt, like);
  if (zeroed_words > 0) {
    STD_CUDA_CHECK(cudaMemsetAsync(scratch.mutable_data_ptr<int32_t>(), 0, zeroed_words * sizeof(int32_t),
                                   cuda::current_stream()));
  }
  return scratch;
}

// The one host synchronisation of the CUDA ops: reads the status word back and raises, only when sync checks
// are on and the current stream is not being captured into a CUDA graph (a capture cannot sync). `translate`
// rewords a layout's status (rect_status for a rectangle cache).
inline void check_status(const char* op, const Tensor& scratch, int32_t (*translate)(int32_t) = nullptr) {
  if (!sync_checks_enabled()) return;
  const cudaStream_t stream = current_stream();
  if (is_capturing(stream)) return;
  int32_t host_status = 0;
  copy_to_host_and_sync(&host_status, scratch.const_data_ptr<int32_t>(), sizeof(int32_t), stream);
  raise_for_status(op, translate != nullptr ? translate(host_status) : host_status);
}

}  // namespace cuda
}  // namespace attngate
