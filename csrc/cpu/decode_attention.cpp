// CPU kernel of attngate::decode_attention: one query token per head over the live rows of a gated cache.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "dispatch.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

// One task per (b, KV head): every query head of the GQA group shares the K/V rows, which are widened to float
// once per row. Two passes over the live rows: scores (then max and exp), then the weighted sum of values.
template <typename scalar_t>
void decode_attention_kernel(const Tensor& query,                                 // (B, Hq, D)
                             const Tensor& key_cache, const Tensor& value_cache,  // (B, H, C, D)
                             const std::vector<int64_t>& lengths, float scale,
                             Tensor& out) {  // (B, Hq, D) contiguous
  const int64_t H = key_cache.size(1), D = key_cache.size(3), Hq = query.size(1), group = Hq / H;
  const scalar_t* q = query.const_data_ptr<scalar_t>();
  const scalar_t* kc = key_cache.const_data_ptr<scalar_t>();
  const scalar_t* vc = value_cache.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t q_sb = query.stride(0), q_sh = query.stride(1);  // read once: each stride() calls into torch
  const cpu::Strides3 kcs = cpu::strides3(key_cache), vcs = cpu::strides3(value_cache);
  torch::stable::parallel_for(0, static_cast<int64_t>(lengths.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(static_cast<size_t>(group * D)), row(static_cast<size_t>(D));
    std::vector<float> acc(static_cast<size_t>(group * D));
    std::vector<float> scores;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, n = lengths[bh];
      for (int64_t g = 0; g < group; ++g) cpu::to_float(q + b * q_sb + (h * group + g) * q_sh, qf.data() + g * D, D);
      const scalar_t* k = kc + kcs.at(b, h, 0);
      const scalar_t* v = vc + vcs.at(b, h, 0);
      scores.assign(static_cast<size_t>(group * n), 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        cpu::to_float(k + j * kcs.s2, row.data(), D);
        for (int64_t g = 0; g < group; ++g) scores[g * n + j] = cpu::dot(qf.data() + g * D, row.data(), D) * scale;
      }
      std::vector<float> inv_sum(static_cast<size_t>(group), 0.0f);
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * n;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
        float sum = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
          s[j] = std::exp(s[j] - mx);
          sum += s[j];
        }
        inv_sum[g] = n > 0 ? 1.0f / sum : 0.0f;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        cpu::to_float(v + j * vcs.s2, row.data(), D);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * n + j];
          float* a = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) a[d] += p * row[d];
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        scalar_t* dst = o + (b * Hq + h * group + g) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[g * D + d] * inv_sum[g]);
      }
    }
  });
}

Tensor decode_attention_cpu(const Tensor& query, const Tensor& key_cache, const Tensor& value_cache,
                            const Tensor& lengths, double scale) {
  check_decode_attention_args(query, key_cache, value_cache, lengths, scale);
  Tensor out = empty_like_device(query.sizes(), query.scalar_type(), query);
  if (out.numel() == 0) return out;
  const std::vector<int64_t> live = cpu::read_lengths(lengths);
  const int64_t C = key_cache.size(2);
  int32_t status = 0;
  for (int64_t n : live)
    if (n < 0 || n > C) status |= kStatusLengthOutOfRange;
  raise_for_status("decode_attention", status);
  ATTNGATE_DISPATCH_FLOATING_TYPES(query.scalar_type(), "decode_attention_cpu", [&] {
    decode_attention_kernel<scalar_t>(query, key_cache, value_cache, live, static_cast<float>(scale), out);
  });
  return out;
}

}  // namespace

ATTNGATE_IMPL(CPU, decode_attention, decode_attention_cpu);

}  // namespace attngate
