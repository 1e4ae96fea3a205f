// CPU kernel of attngate::paged_decode_step_: one decode step of a gated layer in one call. Without ring_keep the
// new token goes to the pages of the heads that keep it (the paged_append_kv_ kernel) and into its window-ring slot;
// with ring_keep the kept row leaving that slot goes to the pages first and the new token waits in the ring. Then
// the query attends over the pages and the valid ring rows (the paged_decode_attention kernel).
//
// Every value check (lengths, every page id, free pages, page-table room) passes before anything is written.
#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "cpu/paged_attention_kernels.h"
#include "cpu/storage_kernels.h"
#include "dispatch.h"
#include "paged_step.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

template <typename scalar_t>
void write_ring_slot(Tensor& ring_key, Tensor& ring_value, Tensor& ring_valid,  // (B, H, W[, D])
                     const std::optional<Tensor>& ring_keep,                    // (B, H, W) or none
                     const Tensor& key, const Tensor& value,                    // (B, H, D)
                     const Tensor& keep, const std::optional<Tensor>& valid, int64_t slot) {
  const int64_t B = key.size(0), H = key.size(1), D = key.size(2);
  scalar_t* rk = ring_key.mutable_data_ptr<scalar_t>();
  scalar_t* rv = ring_value.mutable_data_ptr<scalar_t>();
  bool* rvalid = ring_valid.mutable_data_ptr<bool>();
  const scalar_t* k = key.const_data_ptr<scalar_t>();
  const scalar_t* v = value.const_data_ptr<scalar_t>();
  const bool* kp = keep.const_data_ptr<bool>();
  const bool* vp = valid.has_value() ? valid->const_data_ptr<bool>() : nullptr;
  const int64_t vs = vp != nullptr ? valid->stride(0) : 0;  // strides read once: each stride() calls into torch
  const cpu::Strides3 rks = cpu::strides3(ring_key), rvs = cpu::strides3(ring_value), rvals = cpu::strides3(ring_valid);
  const int64_t k_sb = key.stride(0), k_sh = key.stride(1), v_sb = value.stride(0), v_sh = value.stride(1);
  const int64_t keep_sb = keep.stride(0), keep_sh = keep.stride(1);
  bool* rkeep = ring_keep.has_value() ? ring_keep->mutable_data_ptr<bool>() : nullptr;
  const cpu::Strides3 rkeeps = rkeep != nullptr ? cpu::strides3(*ring_keep) : cpu::Strides3{};
  for (int64_t b = 0; b < B; ++b) {
    const bool row_valid = vp == nullptr || vp[b * vs];
    for (int64_t h = 0; h < H; ++h) {
      std::copy_n(k + b * k_sb + h * k_sh, D, rk + rks.at(b, h, slot));
      std::copy_n(v + b * v_sb + h * v_sh, D, rv + rvs.at(b, h, slot));
      const bool kept = kp[b * keep_sb + h * keep_sh];
      if (rkeep != nullptr) {  // the token waits in the ring, visible, with its flag
        rvalid[rvals.at(b, h, slot)] = row_valid;
        rkeep[rkeeps.at(b, h, slot)] = row_valid && kept;
      } else {
        rvalid[rvals.at(b, h, slot)] = row_valid && !kept;
      }
    }
  }
}

Tensor paged_decode_step_cpu(const Tensor& query, Tensor& key_pages, Tensor& value_pages, Tensor& page_table,
                             Tensor& lengths, Tensor& free_pages, Tensor& free_count, const Tensor& key,
                             const Tensor& value, const Tensor& keep, const std::optional<Tensor>& valid,
                             Tensor& ring_key, Tensor& ring_value, Tensor& ring_valid, int64_t slot, double scale,
                             const std::optional<Tensor>& ring_keep, double softcap) {
  check_paged_decode_step_args(query, key_pages, value_pages, page_table, lengths, free_pages, free_count, key, value,
                               keep, valid, ring_key, ring_value, ring_valid, slot, scale, ring_keep, softcap);
  // The whole paged state first (the append checks only the pages it writes, the attention reads them all).
  std::vector<int64_t> lens;
  raise_for_status("paged_decode_step_", validate_paged_state_cpu(key_pages, page_table, lengths, lens));
  append_step_rows(paged_append_kv_cpu, key_pages, value_pages, page_table, lengths, free_pages, free_count, key, value,
                   keep, ring_key, ring_value, ring_keep, slot);
  ATTNGATE_DISPATCH_FLOATING_TYPES(key.scalar_type(), "paged_decode_step_cpu", [&] {
    write_ring_slot<scalar_t>(ring_key, ring_value, ring_valid, ring_keep, key, value, keep, valid, slot);
  });
  Tensor out = empty_like_device(query.sizes(), query.scalar_type(), query);
  cpu::paged_decode_attention_out(query, key_pages, value_pages, page_table, lengths, scale, softcap, ring_key, ring_value,
                                  ring_valid, out, "paged_decode_step_");
  return out;
}

}  // namespace

ATTNGATE_IMPL(CPU, paged_decode_step_, paged_decode_step_cpu);

}  // namespace attngate
