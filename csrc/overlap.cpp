#include "overlap.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <vector>

namespace attngate {
namespace {

// Beyond this many pieces (rows or elements) the exact comparison is not attempted and the layout is refused as
// unverifiable. Only layouts that the stride proof cannot handle (interleaved strides) ever get here.
constexpr int64_t kMaxExactPieces = int64_t{1} << 22;

struct Dim {
  int64_t size;
  int64_t stride;  // bytes
};

// The pieces of a tensor (its rows, or its elements): piece i starts at base + sum_d i_d * dims[d].stride and
// spans `extent` bytes.
// At most kMaxDims dimensions, held inline: no heap allocation on the per-call path. The ops check their tensors'
// ranks (<= 4) before any overlap check, and a joint layout adds one dimension.
constexpr size_t kMaxDims = 8;

class Dims {
 public:
  void push_back(const Dim& d) {
    AG_CHECK(n_ < kMaxDims, "memory-overlap check: tensors of more than ", kMaxDims - 1,
             " dimensions are not supported");
    dims_[n_++] = d;
  }
  size_t size() const { return n_; }
  Dim& operator[](size_t i) { return dims_[i]; }
  const Dim& operator[](size_t i) const { return dims_[i]; }
  Dim* begin() { return dims_.data(); }
  Dim* end() { return dims_.data() + n_; }
  const Dim* begin() const { return dims_.data(); }
  const Dim* end() const { return dims_.data() + n_; }

 private:
  std::array<Dim, kMaxDims> dims_{};
  size_t n_ = 0;
};

struct Layout {
  Dims dims;
  int64_t extent = 0;
  int64_t base = 0;
  bool empty = true;  // no piece, or pieces of 0 bytes: nothing can overlap
};

// The sizes and strides are read as two arrays: each Tensor::size(d) / stride(d) would be a call into torch.
Layout layout_of(const Tensor& t, bool rows) {
  Layout l;
  const int64_t elem = static_cast<int64_t>(t.element_size());
  const IntArrayRef sizes = t.sizes(), strides = t.strides();
  const int64_t dims = static_cast<int64_t>(sizes.size());
  rows = rows && dims > 0;
  const int64_t nd = rows ? dims - 1 : dims;
  int64_t numel = 1;
  for (int64_t d = 0; d < dims; ++d) numel *= sizes[d];
  for (int64_t d = 0; d < nd; ++d) l.dims.push_back({sizes[d], strides[d] * elem});
  l.extent = rows ? sizes[dims - 1] * elem : elem;
  l.empty = numel == 0 || l.extent == 0;
  if (!l.empty) l.base = static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr()));
  return l;
}

// Byte range [lo, hi) that the pieces of l cover.
std::pair<int64_t, int64_t> span_of(const Layout& l) {
  int64_t lo = l.base, hi = l.base + l.extent;
  for (const Dim& d : l.dims) {
    const int64_t reach = (d.size - 1) * d.stride;
    (reach < 0 ? lo : hi) += reach;
  }
  return {lo, hi};
}

// A proof that all pieces are disjoint: sorted by stride, every dimension steps over the whole range that the
// dimensions below it (and the piece itself) span. True for every slice or permutation of a dense buffer.
bool nested_disjoint(const Dims& dims, int64_t extent) {
  Dims moving;
  for (const Dim& d : dims)
    if (d.size > 1) moving.push_back(d);
  std::sort(moving.begin(), moving.end(), [](const Dim& a, const Dim& b) { return a.stride < b.stride; });
  for (const Dim& d : moving) {
    if (d.stride < extent) return false;
    extent += (d.size - 1) * d.stride;
  }
  return true;
}

struct Piece {
  int64_t start, extent;
  int owner;
};

// Appends every piece of l, shifted by `shift` bytes. False when the budget of pieces would be exceeded.
bool collect_pieces(const Layout& l, int64_t shift, int owner, int64_t& budget, std::vector<Piece>& out) {
  int64_t count = 1;
  for (const Dim& d : l.dims) count *= d.size;  // <= numel, no overflow
  if (count > budget) return false;
  budget -= count;
  const int64_t nd = static_cast<int64_t>(l.dims.size());
  std::vector<int64_t> idx(l.dims.size(), 0);
  int64_t offset = 0;
  for (int64_t n = 0; n < count; ++n) {
    out.push_back({shift + offset, l.extent, owner});
    for (int64_t d = nd - 1; d >= 0; --d) {  // odometer step to the next index
      if (++idx[d] < l.dims[d].size) {
        offset += l.dims[d].stride;
        break;
      }
      offset -= (l.dims[d].size - 1) * l.dims[d].stride;
      idx[d] = 0;
    }
  }
  return true;
}

// Whether two pieces overlap; with cross_only, only pieces of different owners count.
bool any_overlap(std::vector<Piece>& pieces, bool cross_only) {
  std::sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) { return a.start < b.start; });
  int64_t end[2] = {std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::min()};
  for (const Piece& p : pieces) {
    const int64_t reach = cross_only ? end[1 - p.owner] : std::max(end[0], end[1]);
    if (p.start < reach) return true;
    end[p.owner] = std::max(end[p.owner], p.start + p.extent);
  }
  return false;
}

enum class Verdict { kDisjoint, kOverlap, kUnknown };

Verdict self_verdict(const Layout& l) {
  if (l.empty) return Verdict::kDisjoint;
  for (const Dim& d : l.dims)
    if (d.size > 1 && d.stride == 0) return Verdict::kOverlap;
  if (nested_disjoint(l.dims, l.extent)) return Verdict::kDisjoint;
  std::vector<Piece> pieces;
  int64_t budget = kMaxExactPieces;
  if (!collect_pieces(l, 0, 0, budget, pieces)) return Verdict::kUnknown;
  return any_overlap(pieces, false) ? Verdict::kOverlap : Verdict::kDisjoint;
}

Verdict pair_verdict(const Layout& a, const Layout& b) {
  if (a.empty || b.empty) return Verdict::kDisjoint;
  const auto [a_lo, a_hi] = span_of(a);
  const auto [b_lo, b_hi] = span_of(b);
  if (a_hi <= b_lo || b_hi <= a_lo) return Verdict::kDisjoint;
  const int64_t delta = b.base - a.base;
  bool same_strides = a.extent == b.extent && a.dims.size() == b.dims.size();
  for (size_t d = 0; same_strides && d < a.dims.size(); ++d) same_strides = a.dims[d].stride == b.dims[d].stride;
  if (same_strides) {
    if (delta == 0) return Verdict::kOverlap;  // the first pieces coincide
    // Both tensors are sub-lattices of one lattice with an extra dimension {0, delta}: prove that one disjoint.
    Dims joint;
    for (size_t d = 0; d < a.dims.size(); ++d)
      joint.push_back({std::max(a.dims[d].size, b.dims[d].size), a.dims[d].stride});
    joint.push_back({2, delta < 0 ? -delta : delta});
    if (nested_disjoint(joint, a.extent)) return Verdict::kDisjoint;
  }
  std::vector<Piece> pieces;
  int64_t budget = kMaxExactPieces;
  if (!collect_pieces(a, 0, 0, budget, pieces) || !collect_pieces(b, delta, 1, budget, pieces)) {
    return Verdict::kUnknown;
  }
  return any_overlap(pieces, true) ? Verdict::kOverlap : Verdict::kDisjoint;
}

void check_self(const Tensor& t, const char* name, bool rows) {
  const Verdict v = self_verdict(layout_of(t, rows));
  const char* what = rows ? "rows" : "elements";
  AG_CHECK(v != Verdict::kOverlap, name, " must not have internal overlap: two of its ", what,
           " share memory (e.g. an expand()ed or as_strided view); sizes ", t.sizes(), ", strides ", t.strides());
  AG_CHECK(v == Verdict::kDisjoint, name, " must not have internal overlap: its strides ", t.strides(),
           " interleave its ", what, " (sizes ", t.sizes(),
           ") in a way too large to verify; use a slice or permutation of a dense buffer");
}

}  // namespace

void check_no_row_overlap(const Tensor& t, const char* name) { check_self(t, name, /*rows=*/true); }

void check_no_element_overlap(const Tensor& t, const char* name) { check_self(t, name, /*rows=*/false); }

void check_no_shared_memory(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name, bool b_rows) {
  const Verdict v = pair_verdict(layout_of(a, /*rows=*/true), layout_of(b, b_rows));
  AG_CHECK(v != Verdict::kOverlap, a_name, " and ", b_name, " must not share memory");
  AG_CHECK(v != Verdict::kUnknown, a_name, " and ", b_name,
           " must not share memory: they lie in one memory range with strides too interleaved to verify");
}

}  // namespace attngate
