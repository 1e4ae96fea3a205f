// CPU entry point of attngate::append_kv_ on a rectangle cache (B, H, C, D): a head with one page of C rows, run by
// the paged append kernel (cpu/paged_append_kv.cpp), whose "page table full" is the capacity overflow here.
#include "checks.h"
#include "cpu/storage_kernels.h"
#include "kv_tables.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

void append_kv_cpu(Tensor& key_cache, Tensor& value_cache, Tensor& lengths, const Tensor& key, const Tensor& value,
                   const std::optional<Tensor>& keep) {
  check_append_kv_args(key_cache, value_cache, lengths, key, value, keep);
  cpu::append_rows("append_kv_", paged::make_rect_tables(key_cache, lengths), key_cache, value_cache,
                   paged::make_rect_pool(key_cache), paged::make_rect_pool(value_cache), key, value, keep);
}

}  // namespace

ATTNGATE_IMPL(CPU, append_kv_, append_kv_cpu);

}  // namespace attngate
