// Device helpers shared by the CUDA paged attention kernels.
#pragma once

#include "cuda_utils.cuh"

namespace attngate {
namespace paged_device {

constexpr float kLog2e = 1.4426950408889634f;  // scores are kept in the log2 domain: exp2f(s - max)

// One warp's online-softmax step over one row of a key tile: s holds this lane's kN scores (-inf: not visible) and
// becomes their weights; lane 0 updates the row's running max *m and sum *l and writes *alpha, the rescale factor
// of the row's old output (callers read *alpha after a __syncthreads). A row that has seen nothing keeps m = -inf and shifts by 0, so exp2f(-inf) = 0 makes
// every weight and alpha 0 instead of NaN.
template <int kN>
__device__ __forceinline__ void warp_softmax_step(float (&s)[kN], float* m, float* l, float* alpha, int lane) {
  float top = s[0];
#pragma unroll
  for (int i = 1; i < kN; ++i) top = fmaxf(top, s[i]);
  const float m_old = *m;  // read by every lane before lane 0 writes it, after the __syncwarp below
  const float m_new = fmaxf(m_old, cuda::warp_max(top));
  const float shift = m_new == -INFINITY ? 0.f : m_new;
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    s[i] = exp2f(s[i] - shift);
    sum += s[i];
  }
  sum = cuda::warp_sum(sum);
  __syncwarp();  // every lane has read *m (m_old) before lane 0 overwrites it; shuffles do not order memory
  if (lane == 0) {
    const float a = exp2f(m_old - shift);
    *alpha = a;
    *l = *l * a + sum;
    *m = m_new;
  }
}

}  // namespace paged_device
}  // namespace attngate
