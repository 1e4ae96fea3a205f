// Where the CUDA decode attention kernels find the rows of a head's stream (cuda/paged_decode_attention.cu): its
// cache rows through csrc/kv_tables.h (paged pools or a rectangle cache), then its extra rows (dense, with a
// per-row validity mask), and the parameters both decode kernels share.
#pragma once
#include <cstdint>

#include "checks.h"
#include "cuda/cuda_utils.cuh"
#include "kv_tables.h"

namespace attngate {
namespace decode {

constexpr float kLog2e = 1.4426950408889634f;  // scores are kept in the log2 domain: exp2f(s - max)

struct DecodeParams {
  paged::Tables t;                             // lengths and the page table (or a rectangle's)
  paged::Pool kp, vp;                          // the cache rows
  int64_t q_b, q_h;                            // query strides
  int64_t ek_b, ek_h, ek_e, ev_b, ev_h, ev_e;  // extra_key / extra_value strides
  int64_t evd_b, evd_h, evd_e;                 // extra_valid strides
  int64_t E;                                   // extra rows per head
  int64_t Hq, group, ntiles;                   // ntiles: query tiles per KV head
  int D, nvec;
  int pitch;                         // staged row pitch in elements (tiled kernel, vector path)
  int w_off, k_off, v_off, red_off;  // byte offsets into dynamic shared memory (tiled kernel)
  int ncol;                          // column chunks per query head (wide kernel)
  int64_t tile_rows;                 // rows per tile of the kernel (chunks are whole tiles)
  float scale;                       // scale * log2(e)
  float cap;                         // softcap * log2(e), 0: off
};

// Soft-capping (Gemma 2): a score becomes cap * tanh(score / cap), all in the log2 domain; cap 0 leaves it.
__device__ __forceinline__ float soft_cap(float s, float cap) { return cap > 0.f ? cap * tanhf(s / cap) : s; }

// Row j of head bh's stream: cache rows [0, len), then extra row j - len. Sets k/v to null when the row does not
// exist, is an invalid extra row or sits on a bad page (reported when `report`).
template <typename scalar_t>
__device__ __forceinline__ void stream_row(const DecodeParams& p, const scalar_t* key_pages,
                                           const scalar_t* value_pages, const scalar_t* extra_key,
                                           const scalar_t* extra_value, const bool* extra_valid, int64_t bh,
                                           int64_t len, int64_t j, bool report, int32_t* status, const scalar_t*& k,
                                           const scalar_t*& v) {
  k = nullptr;
  v = nullptr;
  if (j < len) {
    // 32-bit division: rows and the page size fit in int32 (the ops check M * page_size < 2^31).
    const uint32_t S = static_cast<uint32_t>(p.t.S), row = static_cast<uint32_t>(j);
    const uint32_t index = row / S, slot = row - index * S;
    const int64_t page = p.t.page(bh, index);
    if (!p.t.id_ok(page)) {
      if (report) atomicOr(status, kStatusBadPageId);
      return;
    }
    k = key_pages + p.kp.at(page, slot);
    v = value_pages + p.vp.at(page, slot);
    return;
  }
  const int64_t e = j - len;
  if (e >= p.E) return;
  const int64_t b = bh / p.t.H, h = bh - b * p.t.H;
  if (extra_valid != nullptr && !extra_valid[b * p.evd_b + h * p.evd_h + e * p.evd_e]) return;
  k = extra_key + b * p.ek_b + h * p.ek_h + e * p.ek_e;
  v = extra_value + b * p.ev_b + h * p.ev_h + e * p.ev_e;
}

}  // namespace decode
}  // namespace attngate
