// Small helpers shared by the CPU kernels.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace attngate::cpu {

// Dot product of two float rows, vectorised with ATen's Vectorized<float>.
inline float dot(const float* a, const float* b, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  Vec acc(0.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  float sum = at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// Widens a row of scalar_t to float.
template <typename scalar_t>
inline void to_float(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Reads lengths (B, H) int32 with any strides into a dense int64 vector [b * H + h].
inline std::vector<int64_t> read_lengths(const at::Tensor& lengths) {
  const int64_t B = lengths.size(0), H = lengths.size(1);
  std::vector<int64_t> out(static_cast<size_t>(B * H));
  const int32_t* p = lengths.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) out[b * H + h] = p[b * lengths.stride(0) + h * lengths.stride(1)];
  return out;
}

inline void write_length(at::Tensor& lengths, int64_t b, int64_t h, int64_t value) {
  lengths.data_ptr<int32_t>()[b * lengths.stride(0) + h * lengths.stride(1)] = static_cast<int32_t>(value);
}

}  // namespace attngate::cpu
