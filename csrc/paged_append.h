// The paged_append_kv_ kernels as C++ functions, for paged_decode_step_, which appends its new token with the
// kernel of its own device. Arguments as in the op schema (csrc/ops.cpp).
#pragma once
#include <optional>

#include "stable_api.h"

namespace attngate {

using PagedAppendFn = void (*)(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                               Tensor& free_pages, Tensor& free_count, const Tensor& key, const Tensor& value,
                               const std::optional<Tensor>& keep);

void paged_append_kv_cpu(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                         Tensor& free_pages, Tensor& free_count, const Tensor& key, const Tensor& value,
                         const std::optional<Tensor>& keep);
void paged_append_kv_cuda(Tensor& key_pages, Tensor& value_pages, Tensor& page_table, Tensor& lengths,
                          Tensor& free_pages, Tensor& free_count, const Tensor& key, const Tensor& value,
                          const std::optional<Tensor>& keep);

}  // namespace attngate
