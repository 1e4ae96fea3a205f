// CPU kernel of attngate::append_kv_: writes the kept new rows after each head's live rows.
#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "dispatch.h"

namespace attngate {
namespace {

template <typename scalar_t>
void append_kv_kernel(at::Tensor& key_cache, at::Tensor& value_cache,  // (B, H, C, D)
                      const at::Tensor& key, const at::Tensor& value,   // (B, H, T, D)
                      const at::Tensor& keep,                           // (B, H, T) bool or undefined
                      const std::vector<int64_t>& start) {              // [b * H + h] first free row
  const int64_t B = key.size(0), H = key.size(1), T = key.size(2), D = key.size(3);
  scalar_t* kc = key_cache.data_ptr<scalar_t>();
  scalar_t* vc = value_cache.data_ptr<scalar_t>();
  const scalar_t* k = key.data_ptr<scalar_t>();
  const scalar_t* v = value.data_ptr<scalar_t>();
  const bool* keep_p = keep.defined() ? keep.data_ptr<bool>() : nullptr;
  at::parallel_for(0, B * H, cpu::grain_for(2 * T * D), [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      int64_t dst = start[bh];
      for (int64_t t = 0; t < T; ++t) {
        if (keep_p != nullptr && !keep_p[b * keep.stride(0) + h * keep.stride(1) + t * keep.stride(2)]) continue;
        const int64_t src_k = b * key.stride(0) + h * key.stride(1) + t * key.stride(2);
        const int64_t src_v = b * value.stride(0) + h * value.stride(1) + t * value.stride(2);
        std::copy_n(k + src_k, D, kc + b * key_cache.stride(0) + h * key_cache.stride(1) + dst * key_cache.stride(2));
        std::copy_n(v + src_v, D,
                    vc + b * value_cache.stride(0) + h * value_cache.stride(1) + dst * value_cache.stride(2));
        ++dst;
      }
    }
  });
}

void append_kv_cpu(at::Tensor& key_cache, at::Tensor& value_cache, at::Tensor& lengths, const at::Tensor& key,
                   const at::Tensor& value, const std::optional<at::Tensor>& keep) {
  check_append_kv_args(key_cache, value_cache, lengths, key, value, keep);
  const int64_t B = key.size(0), H = key.size(1), T = key.size(2), C = key_cache.size(2);
  if (B * H == 0) return;
  // Every head is validated before the first write, so a failing call leaves the cache untouched.
  const std::vector<int64_t> start = cpu::read_lengths(lengths);
  std::vector<int64_t> counts(start.size(), T);
  if (keep.has_value()) {
    const bool* kp = keep->data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        int64_t n = 0;
        for (int64_t t = 0; t < T; ++t) n += kp[b * keep->stride(0) + h * keep->stride(1) + t * keep->stride(2)];
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
      append_kv_kernel<scalar_t>(key_cache, value_cache, key, value, keep.has_value() ? *keep : at::Tensor(), start);
    });
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) cpu::write_length(lengths, b, h, start[b * H + h] + counts[b * H + h]);
}

}  // namespace

TORCH_LIBRARY_IMPL(attngate, CPU, m) { m.impl("append_kv_", &append_kv_cpu); }

}  // namespace attngate
