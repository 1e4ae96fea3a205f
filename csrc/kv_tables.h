// How the storage and attention kernels address a layer's K/V rows, shared by the CPU kernels and (compiled by nvcc,
// on the device) the CUDA kernels. One layout serves both kinds of cache:
//
// * paged: every (batch row, KV head) bh = b * H + h is a sequence of pages of S rows from one pool (P, S, D):
//   logical row r of head bh is slot r % S of page page_table[b, h, r / S]; appends pop pages from the free stack
//   (free_pages, free_count), compaction and removal push them back (layout: attngate_ext/ops/paged.py);
// * rectangle: a (B, H, C, D) cache with any strides is a head with one contiguous page of C rows that it owns:
//   page bh is rows [0, C) of head (b, h), there is no page table and no free stack, and "page table full" means
//   "capacity C exceeded".
//
// The kernels are written once against Tables (lengths, pages, free stack) and Pool (row addresses); only the op
// entry points build one or the other.
#pragma once
#include <cstdint>

#include "stable_api.h"

#if defined(__CUDACC__)
#define ATTNGATE_HD __host__ __device__ __forceinline__
#else
#define ATTNGATE_HD inline
#endif

namespace attngate {
namespace paged {

// Pages that `rows` rows fill. On the device rows < 2^32 and page_size < 2^31 (lengths and kept counts are int32):
// 32-bit division, a few instructions where a 64-bit one is a call.
ATTNGATE_HD int64_t pages_for(int64_t rows, int64_t page_size) {
#if defined(__CUDA_ARCH__)
  const uint32_t r = static_cast<uint32_t>(rows), s = static_cast<uint32_t>(page_size), q = r / s;
  return static_cast<int64_t>(q) + (r - q * s != 0);
#else
  return (rows + page_size - 1) / page_size;
#endif
}

// page_table (B, H, M), lengths (B, H), free_pages (P) and free_count (1), any strides. A rectangle cache has no
// page table (table == nullptr: head bh owns page bh, M = 1) and no free stack (free_pages == nullptr).
struct Tables {
  int32_t* table;
  int64_t t_sb, t_sh, t_sm;
  int32_t* len;
  int64_t l_sb, l_sh;
  int32_t* free_pages;
  int64_t f_s;
  int32_t* free_count;
  int64_t B, H, M, P, S;

  // Whether every head owns its (single) page: no pops, no give-backs, no free stack.
  ATTNGATE_HD bool owns_pages() const { return table == nullptr; }
  // Entry i of head bh's page-table row (paged caches only: they are written by pops and give-backs).
  ATTNGATE_HD int32_t* entry(int64_t bh, int64_t i) const {
    return table + (bh / H) * t_sb + (bh % H) * t_sh + i * t_sm;
  }
  // The id of page i of head bh.
  ATTNGATE_HD int64_t page(int64_t bh, int64_t i) const { return table != nullptr ? *entry(bh, i) : bh; }
  ATTNGATE_HD int32_t* length(int64_t bh) const { return len + (bh / H) * l_sb + (bh % H) * l_sh; }
  ATTNGATE_HD int32_t* free_at(int64_t i) const { return free_pages + i * f_s; }
  ATTNGATE_HD bool id_ok(int64_t id) const { return id >= 0 && id < P; }
  ATTNGATE_HD int64_t capacity() const { return M * S; }
  // Page index and slot of logical row `row` (< capacity < 2^31, checked by the ops: 32-bit division, which on a GPU
  // is a few instructions where a 64-bit one is a call).
  ATTNGATE_HD void locate(int64_t row, int64_t& index, int64_t& slot) const {
    const uint32_t r = static_cast<uint32_t>(row), s = static_cast<uint32_t>(S), i = r / s;
    index = i;
    slot = r - i * s;
  }
  // Batch row and head of bh (B * H < 2^31).
  ATTNGATE_HD void split(int64_t bh, int64_t& b, int64_t& h) const {
    const uint32_t x = static_cast<uint32_t>(bh), heads = static_cast<uint32_t>(H), q = x / heads;
    b = q;
    h = x - q * heads;
  }
};

// Element offsets of the rows of one pool (keys or values): (page, slot) -> page * page_stride + slot * row_stride
// for a paged pool (P, S, D); for a rectangle (B, H, C, D), page bh -> b * batch_stride + h * head_stride.
struct Pool {
  int64_t page_stride, row_stride;
  int64_t heads;  // rectangle: H (page bh splits into b, h); paged: 0
  int64_t batch_stride, head_stride;

  ATTNGATE_HD int64_t page_offset(int64_t page) const {
    if (heads == 0) return page * page_stride;
    // A rectangle's page is a head bh < B * H < 2^31: 32-bit division.
    const uint32_t x = static_cast<uint32_t>(page), n = static_cast<uint32_t>(heads), b = x / n;
    return b * batch_stride + (x - b * n) * head_stride;
  }
  ATTNGATE_HD int64_t at(int64_t page, int64_t slot) const { return page_offset(page) + slot * row_stride; }
};

inline Tables make_tables(const Tensor& key_pages, Tensor& page_table, Tensor& lengths, Tensor& free_pages,
                          Tensor& free_count) {
  return Tables{page_table.mutable_data_ptr<int32_t>(),
                page_table.stride(0),
                page_table.stride(1),
                page_table.stride(2),
                lengths.mutable_data_ptr<int32_t>(),
                lengths.stride(0),
                lengths.stride(1),
                free_pages.mutable_data_ptr<int32_t>(),
                free_pages.stride(0),
                free_count.mutable_data_ptr<int32_t>(),
                page_table.size(0),
                page_table.size(1),
                page_table.size(2),
                key_pages.size(0),
                key_pages.size(1)};
}

// The paged tables without a free stack (the attention ops only read).
inline Tables make_read_tables(const Tensor& key_pages, const Tensor& page_table, const Tensor& lengths) {
  return Tables{page_table.mutable_data_ptr<int32_t>(), page_table.stride(0), page_table.stride(1),
                page_table.stride(2), lengths.mutable_data_ptr<int32_t>(), lengths.stride(0), lengths.stride(1),
                nullptr, 0, nullptr, page_table.size(0), page_table.size(1), page_table.size(2), key_pages.size(0),
                key_pages.size(1)};
}

// A rectangle cache (B, H, C, D) with its lengths (B, H): one owned page of C rows per head. C = 0 is a page of one
// row that no head may use (capacity 0).
inline Tables make_rect_tables(const Tensor& key_cache, const Tensor& lengths) {
  const int64_t B = key_cache.size(0), H = key_cache.size(1), C = key_cache.size(2);
  return Tables{nullptr, 0, 0, 0, lengths.mutable_data_ptr<int32_t>(), lengths.stride(0), lengths.stride(1), nullptr,
                0, nullptr, B, H, C > 0 ? 1 : 0, B * H, C > 0 ? C : 1};
}

inline Pool make_pool(const Tensor& pages) { return Pool{pages.stride(0), pages.stride(1), 0, 0, 0}; }

inline Pool make_rect_pool(const Tensor& cache) {
  return Pool{0, cache.stride(2), cache.size(1), cache.stride(0), cache.stride(1)};
}

}  // namespace paged
}  // namespace attngate
