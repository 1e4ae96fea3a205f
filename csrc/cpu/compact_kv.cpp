// CPU kernel of attngate::compact_kv_: stable in-place compaction of each head's live rows.
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
void compact_head(scalar_t* base, int64_t row_stride, int64_t D, const bool* keep, int64_t keep_stride, int64_t n,
                  int64_t& kept) {
  // dst <= src at every step and rows never overlap, so copying forward never overwrites a row not yet read.
  int64_t dst = 0;
  for (int64_t src = 0; src < n; ++src) {
    if (!keep[src * keep_stride]) continue;
    if (dst != src) std::copy_n(base + src * row_stride, D, base + dst * row_stride);
    ++dst;
  }
  kept = dst;
}

template <typename scalar_t>
void compact_kv_kernel(Tensor& key_cache, Tensor& value_cache, const Tensor& keep, const std::vector<int64_t>& live,
                       std::vector<int64_t>& kept) {
  const int64_t H = key_cache.size(1), D = key_cache.size(3);
  scalar_t* kc = key_cache.mutable_data_ptr<scalar_t>();
  scalar_t* vc = value_cache.mutable_data_ptr<scalar_t>();
  const bool* kp = keep.const_data_ptr<bool>();
  const cpu::Strides3 keeps = cpu::strides3(keep), kcs = cpu::strides3(key_cache), vcs = cpu::strides3(value_cache);
  torch::stable::parallel_for(0, static_cast<int64_t>(live.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const bool* keep_row = kp + keeps.at(b, h, 0);
      compact_head(kc + kcs.at(b, h, 0), kcs.s2, D, keep_row, keeps.s2, live[bh], kept[bh]);
      compact_head(vc + vcs.at(b, h, 0), vcs.s2, D, keep_row, keeps.s2, live[bh], kept[bh]);
    }
  });
}

void compact_kv_cpu(Tensor& key_cache, Tensor& value_cache, Tensor& lengths, const Tensor& keep) {
  check_compact_kv_args(key_cache, value_cache, lengths, keep);
  const int64_t B = key_cache.size(0), H = key_cache.size(1), C = key_cache.size(2), L = keep.size(2);
  if (B * H == 0) return;
  const std::vector<int64_t> live = cpu::read_lengths(lengths);
  int32_t status = 0;
  for (int64_t n : live) {
    if (n < 0 || n > C) status |= kStatusLengthOutOfRange;
    else if (n > L) status |= kStatusKeepTooShort;
  }
  raise_for_status("compact_kv_", status);
  std::vector<int64_t> kept(live.size(), 0);
  ATTNGATE_DISPATCH_FLOATING_TYPES(key_cache.scalar_type(), "compact_kv_cpu", [&] {
    compact_kv_kernel<scalar_t>(key_cache, value_cache, keep, live, kept);
  });
  cpu::write_lengths(lengths, kept);
}

}  // namespace

ATTNGATE_IMPL(CPU, compact_kv_, compact_kv_cpu);

}  // namespace attngate
