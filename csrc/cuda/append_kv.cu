// append_kv_: writes the kept rows of key/value (B, H, T, D) after each head's live rows of the cache.
//
// Small appends (decode steps: T <= kSmallMaxT and at most kSmallMaxUnits 16-byte units of K to move) are one
// launch, append_small_kernel: one block validates every head, then copies the kept rows and updates the
// lengths, all or nothing. Larger appends take three launches, so that a long prefill (T = 32k rows for
// a handful of heads) spreads over the whole GPU:
//   1. count_kept_kernel   kept rows of every (head, chunk of kChunk rows)      (skipped when keep is None)
//   2. plan_lengths_kernel one block: chunk prefixes, validation of every head, then all-or-nothing lengths
//   3. append_rows_kernel  one block per (head, chunk): block scan of the flags, 16-byte row copies
// The plan kernel records the old lengths in scratch, so the copy blocks never read a length that another
// block is updating, and it writes the status word that the copy blocks test before touching the cache.
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

constexpr int kChunk = 256;  // rows of T per block; one flag per thread
constexpr int kThreads = kChunk;
constexpr int kSmallThreads = 1024;
constexpr int64_t kSmallMaxT = 32;         // one keep ballot per head
constexpr int64_t kSmallMaxUnits = 8192;   // 16-byte units of K (and as many of V) that the one block moves
constexpr int64_t kSmallMaxHeads = 4096;   // per-head (old length, kept mask) staged in shared memory

struct AppendParams {
  int64_t BH, H, T, nchunks;
  int64_t kc_sb, kc_sh, kc_sc;  // key_cache strides
  int64_t vc_sb, vc_sh, vc_sc;  // value_cache strides
  int64_t k_sb, k_sh, k_st;     // key strides
  int64_t v_sb, v_sh, v_st;     // value strides
  int64_t keep_sb, keep_sh, keep_st;
  int64_t len_sb, len_sh;       // lengths strides
  int64_t C;
  int64_t units_per_row;        // D / vector width
};

// Copies units [0, units) of one row from src rows to dst rows, threads strided by `step`.
template <typename scalar_t, int kVec>
__device__ __forceinline__ void copy_kv_row(scalar_t* __restrict__ kdst, scalar_t* __restrict__ vdst,
                                            const scalar_t* __restrict__ ksrc, const scalar_t* __restrict__ vsrc,
                                            int64_t first, int64_t units, int step) {
  for (int64_t u = first; u < units; u += step) {
    cuda::copy_elems<scalar_t, kVec>(kdst + u * kVec, ksrc + u * kVec);
    cuda::copy_elems<scalar_t, kVec>(vdst + u * kVec, vsrc + u * kVec);
  }
}

// The whole small append in one block. Phase 1: each warp validates whole heads (reads only) and records the
// head's old length and kept-row mask (one ballot, T <= 32) in shared memory. After the block agrees on the
// status, phase 2 copies every (head, row, unit) item, threads strided over all of them so that independent
// loads are in flight together, and writes the new lengths (every read of a length happened in phase 1).
template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kSmallThreads) append_small_kernel(
    scalar_t* __restrict__ key_cache,    // (B, H, C, D)
    scalar_t* __restrict__ value_cache,  // (B, H, C, D)
    int32_t* __restrict__ lengths,       // (B, H)
    const scalar_t* __restrict__ key,    // (B, H, T, D), T <= kSmallMaxT
    const scalar_t* __restrict__ value,  // (B, H, T, D)
    const bool* __restrict__ keep,       // (B, H, T) or null (every row kept)
    int32_t* __restrict__ status,        // (1) written here
    const AppendParams p) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  __shared__ int old_s[kSmallMaxHeads];
  __shared__ unsigned mask_s[kSmallMaxHeads];
  __shared__ int block_status;
  const int lane = threadIdx.x & 31;
  const int nwarps = blockDim.x >> 5;
  const int BH = static_cast<int>(p.BH), T = static_cast<int>(p.T), units = static_cast<int>(p.units_per_row);
  if (threadIdx.x == 0) block_status = 0;
  __syncthreads();
  for (int bh = threadIdx.x >> 5; bh < BH; bh += nwarps) {
    const int64_t b = bh / p.H, h = bh % p.H;
    const bool f = lane < T && (keep == nullptr || keep[b * p.keep_sb + h * p.keep_sh + lane * p.keep_st]);
    const unsigned kept = __ballot_sync(cuda::kFullMask, f);
    if (lane == 0) {
      const int64_t old = lengths[b * p.len_sb + h * p.len_sh];
      const int bits = old < 0 || old > p.C ? kStatusLengthOutOfRange
                                            : (old + __popc(kept) > p.C ? kStatusCapacityOverflow : 0);
      if (bits != 0) atomicOr(&block_status, bits);
      old_s[bh] = bits != 0 ? 0 : static_cast<int>(old);
      mask_s[bh] = kept;
    }
  }
  __syncthreads();
  const int final_status = block_status;
  if (threadIdx.x == 0) *status = final_status;
  if (final_status != 0) return;

  const int per_head = T * units;  // the host bounds BH * T * units well below 2^31
#pragma unroll 4
  for (int i = threadIdx.x; i < BH * per_head; i += blockDim.x) {
    const int bh = i / per_head, rem = i - bh * per_head;
    const int t = rem / units, u = rem - t * units;
    const unsigned kept = mask_s[bh];
    if (((kept >> t) & 1u) == 0) continue;
    const int64_t b = bh / p.H, h = bh % p.H;
    const int64_t dst = old_s[bh] + __popc(kept & ((1u << t) - 1u));
    cuda::copy_elems<scalar_t, kVec>(key_cache + b * p.kc_sb + h * p.kc_sh + dst * p.kc_sc + u * kVec,
                                     key + b * p.k_sb + h * p.k_sh + t * p.k_st + u * kVec);
    cuda::copy_elems<scalar_t, kVec>(value_cache + b * p.vc_sb + h * p.vc_sh + dst * p.vc_sc + u * kVec,
                                     value + b * p.v_sb + h * p.v_sh + t * p.v_st + u * kVec);
  }
  for (int bh = threadIdx.x; bh < BH; bh += blockDim.x) {
    lengths[(bh / p.H) * p.len_sb + (bh % p.H) * p.len_sh] = old_s[bh] + __popc(mask_s[bh]);
  }
}

template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads) append_rows_kernel(
    scalar_t* __restrict__ key_cache,      // (B, H, C, D)
    scalar_t* __restrict__ value_cache,    // (B, H, C, D)
    const scalar_t* __restrict__ key,      // (B, H, T, D)
    const scalar_t* __restrict__ value,    // (B, H, T, D)
    const bool* __restrict__ keep,         // (B, H, T) or null (every row kept)
    const int32_t* __restrict__ offsets,   // (B * H, nchunks) kept rows before each chunk; null when keep is null
    const int32_t* __restrict__ old_len,   // (B * H) lengths before the append
    const int32_t* __restrict__ status,    // (1) written by plan_lengths_kernel
    const AppendParams p) {
  constexpr int kVec = cuda::vec_elems<scalar_t, kVector>();
  __shared__ int warp_counts[kThreads / 32];
  __shared__ int src_rows[kChunk];
  if (*status != 0) return;  // some head failed validation: nothing may be written anywhere

  const int64_t item = blockIdx.x;  // = bh * nchunks + chunk
  const int64_t bh = item / p.nchunks, chunk = item % p.nchunks;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t t0 = chunk * kChunk;
  const int64_t t = t0 + threadIdx.x;
  const bool flag = t < p.T && (keep == nullptr || keep[b * p.keep_sb + h * p.keep_sh + t * p.keep_st]);
  int n = 0;
  const int pos = cuda::block_exclusive_count<kThreads>(flag, warp_counts, n);
  if (flag) src_rows[pos] = static_cast<int>(threadIdx.x);
  __syncthreads();

  // With keep == null every row is kept, so the chunk's first destination is simply its first row.
  const int64_t dst0 = old_len[bh] + (offsets != nullptr ? offsets[item] : t0);
  const scalar_t* ksrc = key + b * p.k_sb + h * p.k_sh + t0 * p.k_st;
  const scalar_t* vsrc = value + b * p.v_sb + h * p.v_sh + t0 * p.v_st;
  scalar_t* kdst = key_cache + b * p.kc_sb + h * p.kc_sh + dst0 * p.kc_sc;
  scalar_t* vdst = value_cache + b * p.vc_sb + h * p.vc_sh + dst0 * p.vc_sc;
  const int64_t units = p.units_per_row;
  if (units >= kThreads) {  // wide rows: the block copies one row at a time
    for (int r = 0; r < n; ++r) {
      const int64_t src_row = src_rows[r];
      copy_kv_row<scalar_t, kVec>(kdst + r * p.kc_sc, vdst + r * p.vc_sc, ksrc + src_row * p.k_st,
                                  vsrc + src_row * p.v_st, threadIdx.x, units, kThreads);
    }
    return;
  }
  const int u32 = static_cast<int>(units);  // < kThreads: (row, unit) pairs fit in int
  for (int i = threadIdx.x; i < n * u32; i += kThreads) {
    const int r = i / u32;
    const int64_t col = static_cast<int64_t>(i - r * u32) * kVec;
    const int64_t src_row = src_rows[r];
    cuda::copy_elems<scalar_t, kVec>(kdst + r * p.kc_sc + col, ksrc + src_row * p.k_st + col);
    cuda::copy_elems<scalar_t, kVec>(vdst + r * p.vc_sc + col, vsrc + src_row * p.v_st + col);
  }
}

}  // namespace

void append_kv_cuda(Tensor& key_cache, Tensor& value_cache, Tensor& lengths, const Tensor& key, const Tensor& value,
                    const std::optional<Tensor>& keep) {
  check_append_kv_args(key_cache, value_cache, lengths, key, value, keep);
  const int64_t B = key_cache.size(0), H = key_cache.size(1), C = key_cache.size(2), D = key_cache.size(3);
  const int64_t T = key.size(2);
  const int64_t BH = B * H;
  if (BH == 0) return;

  const cuda::DeviceGuard device_guard(key_cache);
  const cudaStream_t stream = cuda::current_stream();
  const int64_t nchunks = cuda::ceil_div(T, kChunk);
  AG_CHECK(BH * nchunks <= std::numeric_limits<int32_t>::max(), "append_kv_: B * H * ceil(T / ", kChunk,
           ") must fit in a CUDA grid, got ", BH * nchunks);
  const bool has_keep = keep.has_value();
  const bool vec = rows_aligned_for(16, {&key_cache, &value_cache, &key, &value});
  const int64_t units16 = cuda::ceil_div(D * static_cast<int64_t>(key_cache.element_size()), 16);
  const bool small = T <= kSmallMaxT && BH <= kSmallMaxHeads && BH * T * units16 <= kSmallMaxUnits;

  AppendParams p;
  p.BH = BH, p.H = H, p.T = T, p.nchunks = nchunks;
  p.kc_sb = key_cache.stride(0), p.kc_sh = key_cache.stride(1), p.kc_sc = key_cache.stride(2);
  p.vc_sb = value_cache.stride(0), p.vc_sh = value_cache.stride(1), p.vc_sc = value_cache.stride(2);
  p.k_sb = key.stride(0), p.k_sh = key.stride(1), p.k_st = key.stride(2);
  p.v_sb = value.stride(0), p.v_sh = value.stride(1), p.v_st = value.stride(2);
  p.keep_sb = has_keep ? keep->stride(0) : 0, p.keep_sh = has_keep ? keep->stride(1) : 0;
  p.keep_st = has_keep ? keep->stride(2) : 0;
  p.len_sb = lengths.stride(0), p.len_sh = lengths.stride(1);
  p.C = C;
  p.units_per_row = vec ? D / (16 / static_cast<int64_t>(key_cache.element_size())) : D;
  const bool* keep_ptr = has_keep ? keep->const_data_ptr<bool>() : nullptr;

  if (small) {
    const Tensor scratch = cuda::make_status_scratch(key_cache, 0, 0);  // the kernel writes the status
    const int64_t items = BH * T * p.units_per_row;  // <= kSmallMaxUnits * 8 (scalar bfloat16 rows)
    const int threads = static_cast<int>(std::min<int64_t>(kSmallThreads, cuda::round_up(std::max(BH * 32, items), 32)));
    ATTNGATE_DISPATCH_FLOATING_TYPES(key_cache.scalar_type(), "append_kv_cuda", [&] {
      auto kernel = vec ? append_small_kernel<scalar_t, true> : append_small_kernel<scalar_t, false>;
      kernel<<<1, threads, 0, stream>>>(key_cache.mutable_data_ptr<scalar_t>(),
                                        value_cache.mutable_data_ptr<scalar_t>(), lengths.mutable_data_ptr<int32_t>(),
                                        key.mutable_data_ptr<scalar_t>(), value.mutable_data_ptr<scalar_t>(), keep_ptr,
                                        scratch.mutable_data_ptr<int32_t>(), p);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
    cuda::check_status("append_kv_", scratch);
    return;
  }

  // Scratch: [status][old_len: BH][new_len: BH][chunk offsets: BH * nchunks when keep is given]. The plan kernel
  // writes every word it or the copy kernel reads, so nothing needs zeroing.
  const Tensor scratch = cuda::make_status_scratch(key_cache, 2 * BH + (has_keep ? BH * nchunks : 0), 0);
  int32_t* status = scratch.mutable_data_ptr<int32_t>();
  int32_t* old_len = status + 1;
  int32_t* new_len = old_len + BH;
  int32_t* offsets = has_keep ? new_len + BH : nullptr;

  if (has_keep && nchunks > 0) {
    cuda::count_kept_kernel<kThreads><<<static_cast<unsigned>(BH * nchunks), kThreads, 0, stream>>>(
        keep_ptr, nullptr, offsets, H, p.keep_sb, p.keep_sh, p.keep_st, 0, 0, nchunks, kChunk, T);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int plan_threads = static_cast<int>(std::min<int64_t>(cuda::kPlanThreads, BH * 32));
  cuda::plan_lengths_kernel<true><<<1, plan_threads, 0, stream>>>(lengths.mutable_data_ptr<int32_t>(), offsets, old_len,
                                                                  new_len, status, BH, H, lengths.stride(0),
                                                                  lengths.stride(1), nchunks, T, C, /*keep_len=*/0);
  STD_CUDA_KERNEL_LAUNCH_CHECK();

  if (nchunks > 0 && D > 0) {
    ATTNGATE_DISPATCH_FLOATING_TYPES(key_cache.scalar_type(), "append_kv_cuda", [&] {
      auto kernel = vec ? append_rows_kernel<scalar_t, true> : append_rows_kernel<scalar_t, false>;
      kernel<<<static_cast<unsigned>(BH * nchunks), kThreads, 0, stream>>>(
          key_cache.mutable_data_ptr<scalar_t>(), value_cache.mutable_data_ptr<scalar_t>(),
          key.mutable_data_ptr<scalar_t>(), value.mutable_data_ptr<scalar_t>(), keep_ptr, offsets, old_len, status, p);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  cuda::check_status("append_kv_", scratch);
}

ATTNGATE_IMPL(CUDA, append_kv_, append_kv_cuda);

}  // namespace attngate
