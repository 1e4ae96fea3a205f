// CPU entry point of attngate::compact_kv_ on a rectangle cache (B, H, C, D): a head with one page of C rows, run
// by the paged compaction kernel (cpu/paged_compact_kv.cpp).
#include "checks.h"
#include "cpu/storage_kernels.h"
#include "kv_tables.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

void compact_kv_cpu(Tensor& key_cache, Tensor& value_cache, Tensor& lengths, const Tensor& keep) {
  check_compact_kv_args(key_cache, value_cache, lengths, keep);
  cpu::compact_rows("compact_kv_", paged::make_rect_tables(key_cache, lengths), key_cache, value_cache,
                    paged::make_rect_pool(key_cache), paged::make_rect_pool(value_cache), keep);
}

}  // namespace

ATTNGATE_IMPL(CPU, compact_kv_, compact_kv_cpu);

}  // namespace attngate
