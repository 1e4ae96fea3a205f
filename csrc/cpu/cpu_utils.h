// Small helpers shared by the CPU kernels.
#pragma once
#include <algorithm>
#include <vector>

#include "stable_api.h"

namespace attngate::cpu {

// Items per parallel_for task such that a task handles at least ~32K elements. Small ops (a decode step's
// append: one row per head) then run on the calling thread: waking the thread pool costs more than the work, and
// on a loaded machine a parallel region can wait a whole scheduler slice for its second thread.
inline int64_t grain_for(int64_t elems_per_item) {
  constexpr int64_t kMinTaskElems = int64_t{1} << 15;
  return std::max<int64_t>(1, kMinTaskElems / std::max<int64_t>(1, elems_per_item));
}

// Dot product of two float rows. Eight independent partial sums make the loop body lane-wise, so the compiler
// vectorises it for the baseline ISA (a plain `sum += a[i] * b[i]` is a serial chain without -ffast-math, and
// ATen's Vectorized<float> falls back to its generic scalar version in an extension built without
// CPU_CAPABILITY flags).
inline float dot(const float* a, const float* b, int64_t n) {
  constexpr int64_t kLanes = 8;
  float acc[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// Widens a row of scalar_t to float.
template <typename scalar_t>
inline void to_float(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// The strides of a tensor's first three dimensions, read once (each Tensor::stride() is a call into torch), and
// the element offset of [i, j, k].
struct Strides3 {
  int64_t s0 = 0, s1 = 0, s2 = 0;
  int64_t at(int64_t i, int64_t j, int64_t k) const { return i * s0 + j * s1 + k * s2; }
};
inline Strides3 strides3(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Reads lengths (B, H) int32 with any strides into a dense int64 vector [b * H + h].
inline std::vector<int64_t> read_lengths(const Tensor& lengths) {
  const int64_t B = lengths.size(0), H = lengths.size(1);
  std::vector<int64_t> out(static_cast<size_t>(B * H));
  const int32_t* p = lengths.const_data_ptr<int32_t>();
  const int64_t s0 = lengths.stride(0), s1 = lengths.stride(1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) out[b * H + h] = p[b * s0 + h * s1];
  return out;
}

// Writes values [b * H + h] into lengths (B, H) int32 with any strides.
inline void write_lengths(Tensor& lengths, const std::vector<int64_t>& values) {
  const int64_t B = lengths.size(0), H = lengths.size(1);
  int32_t* p = lengths.mutable_data_ptr<int32_t>();
  const int64_t s0 = lengths.stride(0), s1 = lengths.stride(1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) p[b * s0 + h * s1] = static_cast<int32_t>(values[b * H + h]);
}

}  // namespace attngate::cpu
