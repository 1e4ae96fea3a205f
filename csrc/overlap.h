// Memory-overlap checks for the tensors an op writes. ATen's has_internal_overlap / get_overlap_status answer
// "too hard" for every layout that is not dense (sliced, padded or as_strided caches), so these checks decide
// themselves: first a proof from the strides (sorted by stride, each dimension steps over everything the
// dimensions below it span), and when that proof does not apply, an exact comparison of the rows' byte ranges.
#pragma once

#include "stable_api.h"

namespace attngate {

// Raises "<name> must not have internal overlap: ..." when two rows of t (its last-dim slices; the last dimension
// has stride 1) share memory, e.g. an expand()ed view or an as_strided view whose rows overlap.
void check_no_row_overlap(const Tensor& t, const char* name);

// The same for every element of t (for tensors without a contiguous last dimension, such as lengths).
void check_no_element_overlap(const Tensor& t, const char* name);

// Raises "<a_name> and <b_name> must not share memory" when a row of a and a piece of b share memory. The pieces
// of b are its rows (last dimension of stride 1) when b_rows is true, its elements otherwise.
void check_no_shared_memory(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name,
                            bool b_rows = true);

}  // namespace attngate
