// CPU entry point of attngate::decode_attention on a rectangle cache (B, H, C, D): a head with one page of C rows,
// run by the paged decode attention kernel (cpu/paged_decode_attention.cpp) without extra rows.
#include "checks.h"
#include "cpu/paged_attention_kernels.h"
#include "kv_tables.h"
#include "registration.h"
#include "stable_api.h"

namespace attngate {
namespace {

Tensor decode_attention_cpu(const Tensor& query, const Tensor& key_cache, const Tensor& value_cache,
                            const Tensor& lengths, double scale, double softcap) {
  check_decode_attention_args(query, key_cache, value_cache, lengths, scale, softcap);
  Tensor out = empty_like_device(query.sizes(), query.scalar_type(), query);
  cpu::decode_attention_out(paged::make_rect_tables(key_cache, lengths), key_cache, value_cache,
                            paged::make_rect_pool(key_cache), paged::make_rect_pool(value_cache), query, scale,
                            softcap, std::nullopt, std::nullopt, std::nullopt, out, "decode_attention");
  return out;
}

}  // namespace

ATTNGATE_IMPL(CPU, decode_attention, decode_attention_cpu);

}  // namespace attngate
