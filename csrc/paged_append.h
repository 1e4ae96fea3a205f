// The paged_append_kv_ kernels as C++ functions, for paged_decode_step_, which appends its new token with the
// kernel of its own device. Arguments as in the op schema (csrc/ops.cpp).
#pragma once
#include <cstdint>
#include <optional>

#include "stable_api.h"

namespace attngate {

void paged_append_kv_cpu(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                         Tensor& free_pages, Tensor& free_count, const Tensor& key, const Tensor& value,
                         const std::optional<Tensor>& keep);
// Enqueues the CUDA append on the current stream behind a status word that earlier kernels of the caller may
// have set: the append writes nothing when *status != 0 at its start, ORs its own errors into it, and does not
// read it back (the caller does, once). Arguments must have passed check_paged_append_args.
void enqueue_paged_append_kv_cuda(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                                  Tensor& free_pages, Tensor& free_count, const Tensor& key, const Tensor& value,
                                  const std::optional<Tensor>& keep, int32_t* status);

}  // namespace attngate
