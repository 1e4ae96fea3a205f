// CPU kernel of attngate::append_kv_: writes the kept new rows after each head's live rows.
#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "dispatch.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

template <typename scalar_t>
void append_kv_kernel(Tensor& key_cache, Tensor& value_cache,  // (B, H, C, D)
                      const Tensor& key, const Tensor& value,  // (B, H, T, D)
                      const Tensor& keep,                      // (B, H, T) bool or undefined
                      const std::vector<int64_t>& start) {     // [b * H + h] first free row
  const int64_t B = key.size(0), H = key.size(1), T = key.size(2), D = key.size(3);
  scalar_t* kc = key_cache.mutable_data_ptr<scalar_t>();
  scalar_t* vc = value_cache.mutable_data_ptr<scalar_t>();
  const scalar_t* k = key.const_data_ptr<scalar_t>();
  const scalar_t* v = value.const_data_ptr<scalar_t>();
  const bool* keep_p = keep.defined() ? keep.const_data_ptr<bool>() : nullptr;
  // Strides read once: each Tensor::stride() is a call into torch.
  const cpu::Strides3 ks = cpu::strides3(key), vs = cpu::strides3(value), kcs = cpu::strides3(key_cache),
                      vcs = cpu::strides3(value_cache);
  const cpu::Strides3 keeps = keep.defined() ? cpu::strides3(keep) : cpu::Strides3{};
  torch::stable::parallel_for(0, B * H, cpu::grain_for(2 * T * D), [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      int64_t dst = start[bh];
      for (int64_t t = 0; t < T; ++t) {
        if (keep_p != nullptr && !keep_p[keeps.at(b, h, t)]) continue;
        std::copy_n(k + ks.at(b, h, t), D, kc + kcs.at(b, h, dst));
        std::copy_n(v + vs.at(b, h, t), D, vc + vcs.at(b, h, dst));
        ++dst;
      }
    }
  });
}

void append_kv_cpu(Tensor& key_cache, Tensor& value_cache, Tensor& lengths, const Tensor& key, const Tensor& value,
                   const std::optional<Tensor>& keep) {
  check_append_kv_args(key_cache, value_cache, lengths, key, value, keep);
  const int64_t B = key.size(0), H = key.size(1), T = key.size(2), C = key_cache.size(2);
  if (B * H == 0) return;
  // Every head is validated before the first write, so a failing call leaves the cache untouched.
  const std::vector<int64_t> start = cpu::read_lengths(lengths);
  std::vector<int64_t> counts(start.size(), T);
  if (keep.has_value()) {
    const bool* kp = keep->const_data_ptr<bool>();
    const cpu::Strides3 keeps = cpu::strides3(*keep);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        int64_t n = 0;
        for (int64_t t = 0; t < T; ++t) n += kp[keeps.at(b, h, t)];
        counts[b * H + h] = n;
      }
  }
  int32_t status = 0;
  for (size_t i = 0; i < start.size(); ++i) {
    if (start[i] < 0 || start[i] > C) status |= kStatusLengthOutOfRange;
    else if (start[i] + counts[i] > C) status |= kStatusCapacityOverflow;
  }
  raise_for_status("append_kv_", status);
  if (T > 0 && key.size(3) > 0) {
    ATTNGATE_DISPATCH_FLOATING_TYPES(key_cache.scalar_type(), "append_kv_cpu", [&] {
      append_kv_kernel<scalar_t>(key_cache, value_cache, key, value, keep.has_value() ? *keep : Tensor(), start);
    });
  }
  for (size_t i = 0; i < counts.size(); ++i) counts[i] += start[i];
  cpu::write_lengths(lengths, counts);
}

}  // namespace

ATTNGATE_IMPL(CPU, append_kv_, append_kv_cpu);

}  // namespace attngate
