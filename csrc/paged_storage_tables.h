// The int32 bookkeeping of one paged layer as raw pointers and strides, shared by the CPU kernels and (compiled by
// nvcc, on the device) the CUDA kernels of the paged storage ops. Layout: attngate_ext/ops/paged.py.
#pragma once
#include <cstdint>

#include "stable_api.h"

#if defined(__CUDACC__)
#define ATTNGATE_PAGED_HD __host__ __device__ __forceinline__
#else
#define ATTNGATE_PAGED_HD inline
#endif

namespace attngate {
namespace paged {

ATTNGATE_PAGED_HD int64_t pages_for(int64_t rows, int64_t page_size) { return (rows + page_size - 1) / page_size; }

// page_table (B, H, M), lengths (B, H), free_pages (P) and free_count (1), any strides; heads are numbered
// bh = b * H + h.
struct Tables {
  int32_t* table;
  int64_t t_sb, t_sh, t_sm;
  int32_t* len;
  int64_t l_sb, l_sh;
  int32_t* free_pages;
  int64_t f_s;
  int32_t* free_count;
  int64_t B, H, M, P, S;

  ATTNGATE_PAGED_HD int32_t* entry(int64_t bh, int64_t i) const {
    return table + (bh / H) * t_sb + (bh % H) * t_sh + i * t_sm;
  }
  ATTNGATE_PAGED_HD int32_t* length(int64_t bh) const { return len + (bh / H) * l_sb + (bh % H) * l_sh; }
  ATTNGATE_PAGED_HD int32_t* free_at(int64_t i) const { return free_pages + i * f_s; }
  ATTNGATE_PAGED_HD bool id_ok(int64_t id) const { return id >= 0 && id < P; }
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

}  // namespace paged
}  // namespace attngate
