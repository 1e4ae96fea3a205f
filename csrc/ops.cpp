// The one place where every attngate op schema is declared. Backends only add TORCH_LIBRARY_IMPL blocks
// next to their kernels (csrc/cpu/*.cpp, csrc/cuda/*.cu). Mutating ops mark their outputs `(a!)`.
#include <torch/library.h>

#include "checks.h"

TORCH_LIBRARY(attngate, m) {
  // Fused gate scoring: probs = sigmoid(gate_out @ weight^T + bias) as (B, H, T) float32, keep = probs >= threshold,
  // forced true for sink positions, forced false where valid is false.
  m.def(
      "gate_flags(Tensor gate_out, Tensor weight, Tensor? bias, float threshold, int sink_tokens, "
      "int position_offset, Tensor? valid) -> (Tensor probs, Tensor keep)");
  // Appends the kept rows of key/value (B, H, T, D) to each head's live rows; lengths grows by the kept count.
  m.def(
      "append_kv_(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor(c!) lengths, Tensor key, Tensor value, "
      "Tensor? keep) -> ()");
  // Stable in-place compaction: each head's live rows with keep true move to the front; lengths = their count.
  m.def("compact_kv_(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor(c!) lengths, Tensor keep) -> ()");
  // One-token attention of query (B, Hq, D) over each KV head's live rows (GQA), float32 accumulation.
  m.def("decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor lengths, float scale) -> Tensor");
  // Turns the host read-back of device-side value checks (lengths range, capacity) on CUDA on or off; returns
  // the previous setting. CPU checks are always on. See README "Errors and host synchronisation".
  m.def("set_sync_checks(bool enabled) -> bool", &attngate::set_sync_checks);
}
