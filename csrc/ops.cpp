// The one place where every attngate op schema is declared. Backends only list their kernels with ATTNGATE_IMPL
// next to the code (csrc/cpu/*.cpp, csrc/cuda/*.cu); csrc/registration.cpp registers both. Mutating ops mark
// their outputs `(a!)`.
#include "checks.h"
#include "registration.h"

namespace attngate {

const char* const kSchemas[] = {
    // Fused gate scoring: probs = sigmoid(gate_out @ weight^T + bias) as (B, H, T) float32, keep = probs >= threshold,
    // forced true for sink positions, forced false where valid is false.
    "gate_flags(Tensor gate_out, Tensor weight, Tensor? bias, float threshold, int sink_tokens, "
    "int position_offset, Tensor? valid) -> (Tensor probs, Tensor keep)",
    // Appends the kept rows of key/value (B, H, T, D) to each head's live rows; lengths grows by the kept count.
    "append_kv_(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor(c!) lengths, Tensor key, Tensor value, "
    "Tensor? keep) -> ()",
    // Stable in-place compaction: each head's live rows with keep true move to the front; lengths = their count.
    "compact_kv_(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor(c!) lengths, Tensor keep) -> ()",
    // One-token attention of query (B, Hq, D) over each KV head's live rows (GQA), float32 accumulation. Every
    // attention op takes softcap: scores (after scale) become softcap * tanh(score / softcap) when it is > 0 (Gemma 2).
    "decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor lengths, float scale, "
    "float softcap=0.) -> Tensor",

    // ---- Paged per-(batch, KV head) storage (layout: see attngate_ext/ops/paged.py) ----------------------------
    // One layer: key_pages/value_pages (P, S, D) pages of S rows, page_table (B, H, M) int32 (logical row r of head
    // (b, h) is row r % S of page page_table[b, h, r / S]), lengths (B, H) int32, and a free-page stack on the device:
    // free_pages (P) int32, whose first free_count[0] entries are the free page ids.

    // Appends the kept rows of key/value (B, H, T, D) after each head's rows, taking pages from the free stack.
    "paged_append_kv_(Tensor(a!) key_pages, Tensor(b!) value_pages, Tensor(c!) page_table, Tensor(d!) lengths, "
    "Tensor(e!) free_pages, Tensor(f!) free_count, Tensor key, Tensor value, Tensor? keep) -> ()",
    // Stable in-place compaction of each head's rows with keep (B, H, L); pages that empty go back to the free stack.
    "paged_compact_kv_(Tensor(a!) key_pages, Tensor(b!) value_pages, Tensor(c!) page_table, Tensor(d!) lengths, "
    "Tensor(e!) free_pages, Tensor(f!) free_count, Tensor keep) -> ()",
    // Deletes the rows listed in rows (B, H, K) (negative = none) by moving the last surviving rows into the holes:
    // O(K) row moves, order not kept; pages that empty go back to the free stack.
    "paged_remove_rows_(Tensor(a!) key_pages, Tensor(b!) value_pages, Tensor(c!) page_table, Tensor(d!) lengths, "
    "Tensor(e!) free_pages, Tensor(f!) free_count, Tensor rows) -> ()",
    // One-token attention of query (B, Hq, D) over each KV head's paged rows plus optional dense extra rows
    // extra_key/extra_value (B, H, E, D) where extra_valid (B, H, E); GQA; float32 accumulation.
    "paged_decode_attention(Tensor query, Tensor key_pages, Tensor value_pages, Tensor page_table, "
    "Tensor lengths, float scale, Tensor? extra_key=None, Tensor? extra_value=None, "
    "Tensor? extra_valid=None, float softcap=0.) -> Tensor",
    // A chunk of T queries (B, Hq, T, D) over each KV head's paged rows (all visible), optional extra rows visible to
    // queries t <= extra_until[b, h, e], and the chunk's own key/value (B, H, T, D) under the eviction rule (keep,
    // valid, window, causal). Online softmax: no T x length mask, no copy of the cache.
    "paged_prefill_attention(Tensor query, Tensor key_pages, Tensor value_pages, Tensor page_table, "
    "Tensor lengths, Tensor key, Tensor value, Tensor keep, Tensor? valid, int window, float scale, "
    "Tensor? extra_key=None, Tensor? extra_value=None, Tensor? extra_until=None, float softcap=0.) -> Tensor",
    // One fused decode step. Without ring_keep: appends the new token key/value (B, H, D) to the pages of the heads
    // where keep (B, H), writes it into slot `slot` of the ring of recent rows ring_key/ring_value (B, H, W, D) with
    // ring_valid[:, :, slot] = valid & ~keep. With ring_keep (B, H, W) (the ring holds kept tokens until they leave
    // the window): first appends the row leaving slot `slot` to the pages where ring_keep[:, :, slot], then writes
    // the new token there with ring_valid = valid and ring_keep = valid & keep. Then attends with query (B, Hq, D)
    // over the pages plus the valid ring rows (paged_append_kv_ + ring write + paged_decode_attention in one call).
    "paged_decode_step_(Tensor query, Tensor(a!) key_pages, Tensor(b!) value_pages, Tensor(c!) page_table, "
    "Tensor(d!) lengths, Tensor(e!) free_pages, Tensor(f!) free_count, Tensor key, Tensor value, Tensor keep, "
    "Tensor? valid, Tensor(g!) ring_key, Tensor(h!) ring_value, Tensor(i!) ring_valid, int slot, float scale, "
    "Tensor(j!)? ring_keep=None, float softcap=0.) -> Tensor",
    // Turns the host read-back of device-side value checks (lengths range, capacity) on CUDA on or off; returns
    // the previous setting. CPU checks are always on. See docs/ops.md, "Errors and host synchronisation".
    "set_sync_checks(bool enabled) -> bool",
};
const int kNumSchemas = static_cast<int>(sizeof(kSchemas) / sizeof(kSchemas[0]));

// No tensor argument: one kernel for every backend.
ATTNGATE_IMPL(CompositeExplicitAutograd, set_sync_checks, set_sync_checks);

}  // namespace attngate
