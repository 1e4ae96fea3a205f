"""Fake (meta) implementations of every ``torch.ops.attngate`` op: the shape, dtype and device contracts that
``torch.compile``, FakeTensor and meta tensors trace with. The ops themselves are registered in C++ (``csrc/ops.cpp``
holds every schema); the Python wrappers and docstrings are in :mod:`attngate_ext.ops.rectangle` and
:mod:`attngate_ext.ops.paged`.
"""

from __future__ import annotations

import torch

# ---- rectangle ops ----------------------------------------------------------------------------------------------

@torch.library.register_fake("attngate::gate_flags")
def _gate_flags_fake(gate_out, weight, bias, threshold, sink_tokens, position_offset, valid):
    torch._check(gate_out.dim() == 3, lambda: f"gate_out must be 3-D (B, T, G), got {tuple(gate_out.shape)}")
    torch._check(
        weight.dim() == 2 and weight.shape[1] == gate_out.shape[2],
        lambda: f"weight must have shape (H, G={gate_out.shape[2]}), got {tuple(weight.shape)}",
    )
    torch._check(weight.dtype == gate_out.dtype, lambda: "weight must have the dtype of gate_out")
    for tensor, name in ((weight, "weight"), (bias, "bias"), (valid, "valid")):
        if tensor is not None:
            _check_same_device(tensor, name, gate_out, "gate_out")
    B, T, _ = gate_out.shape
    H = weight.shape[0]
    probs = gate_out.new_empty((B, H, T), dtype=torch.float32)
    keep = gate_out.new_empty((B, H, T), dtype=torch.bool)
    return probs, keep


def _check_same_device(tensor, name: str, ref, ref_name: str) -> None:
    torch._check(
        tensor.device == ref.device,
        lambda: f"{name} must be on the same device as {ref_name} ({ref.device}), got {tensor.device}",
    )


def _check_cache_fake(key_cache, value_cache, lengths) -> None:
    _check_same_device(value_cache, "value_cache", key_cache, "key_cache")
    _check_same_device(lengths, "lengths", key_cache, "key_cache")
    torch._check(key_cache.dim() == 4, lambda: f"key_cache must be 4-D (B, H, C, D), got {tuple(key_cache.shape)}")
    torch._check(value_cache.shape == key_cache.shape, lambda: "value_cache must have the shape of key_cache")
    torch._check(lengths.dtype == torch.int32, lambda: f"lengths must be int32, got {lengths.dtype}")
    torch._check(
        lengths.shape == key_cache.shape[:2], lambda: f"lengths must have shape (B, H), got {tuple(lengths.shape)}"
    )


def _check_new_rows_fake(key, value, keep, cache, cache_name: str) -> None:
    """New tokens to append: key/value ``(B, H, T, D)`` and their flags, on the cache's device."""
    torch._check(key.dim() == 4, lambda: f"key must be 4-D (B, H, T, D), got {tuple(key.shape)}")
    torch._check(value.shape == key.shape, lambda: "value must have the shape of key")
    for tensor, name in ((key, "key"), (value, "value"), (keep, "keep")):
        if tensor is not None:
            _check_same_device(tensor, name, cache, cache_name)


@torch.library.register_fake("attngate::append_kv_")
def _append_kv_fake(key_cache, value_cache, lengths, key, value, keep):
    _check_cache_fake(key_cache, value_cache, lengths)
    _check_new_rows_fake(key, value, keep, key_cache, "key_cache")


@torch.library.register_fake("attngate::compact_kv_")
def _compact_kv_fake(key_cache, value_cache, lengths, keep):
    _check_cache_fake(key_cache, value_cache, lengths)
    torch._check(keep.dim() == 3, lambda: f"keep must be 3-D (B, H, L), got {tuple(keep.shape)}")
    _check_same_device(keep, "keep", key_cache, "key_cache")
    return None


@torch.library.register_fake("attngate::decode_attention")
def _decode_attention_fake(query, key_cache, value_cache, lengths, scale, softcap=0.0):
    _check_cache_fake(key_cache, value_cache, lengths)
    torch._check(query.dim() == 3, lambda: f"query must be 3-D (B, Hq, D), got {tuple(query.shape)}")
    torch._check(query.dtype == key_cache.dtype, lambda: "query must have the dtype of key_cache")
    _check_same_device(query, "query", key_cache, "key_cache")
    return query.new_empty(query.shape).contiguous()


# ---- paged ops --------------------------------------------------------------------------------------------------

def _check_paged_fake(key_pages, value_pages, page_table, lengths) -> None:
    torch._check(key_pages.dim() == 3, lambda: f"key_pages must be 3-D (P, S, D), got {tuple(key_pages.shape)}")
    torch._check(value_pages.shape == key_pages.shape, lambda: "value_pages must have the shape of key_pages")
    torch._check(value_pages.dtype == key_pages.dtype, lambda: "value_pages must have the dtype of key_pages")
    torch._check(page_table.dim() == 3, lambda: f"page_table must be 3-D (B, H, M), got {tuple(page_table.shape)}")
    torch._check(page_table.dtype == torch.int32, lambda: f"page_table must be int32, got {page_table.dtype}")
    torch._check(lengths.dtype == torch.int32, lambda: f"lengths must be int32, got {lengths.dtype}")
    torch._check(lengths.shape == page_table.shape[:2],
                 lambda: f"lengths must have shape (B, H) = {tuple(page_table.shape[:2])}, got {tuple(lengths.shape)}")
    for tensor, name in ((value_pages, "value_pages"), (page_table, "page_table"), (lengths, "lengths")):
        _check_same_device(tensor, name, key_pages, "key_pages")


def _check_free_fake(key_pages, free_pages, free_count) -> None:
    torch._check(free_pages.dim() == 1 and free_pages.dtype == torch.int32,
                 lambda: f"free_pages must be 1-D int32, got {tuple(free_pages.shape)} {free_pages.dtype}")
    torch._check(free_count.shape == (1,) and free_count.dtype == torch.int32,
                 lambda: f"free_count must be (1,) int32, got {tuple(free_count.shape)} {free_count.dtype}")
    _check_same_device(free_pages, "free_pages", key_pages, "key_pages")
    _check_same_device(free_count, "free_count", key_pages, "key_pages")


@torch.library.register_fake("attngate::paged_append_kv_")
def _paged_append_kv_fake(key_pages, value_pages, page_table, lengths, free_pages, free_count, key, value, keep):
    _check_paged_fake(key_pages, value_pages, page_table, lengths)
    _check_free_fake(key_pages, free_pages, free_count)
    _check_new_rows_fake(key, value, keep, key_pages, "key_pages")


def _check_storage_fake(state, tensor, name: str, layout: str) -> None:
    """The paged state of a storage op (pools, table, lengths, free stack) and its 3-D per-head argument."""
    _check_paged_fake(*state[:4])
    _check_free_fake(state[0], *state[4:])
    torch._check(tensor.dim() == 3, lambda: f"{name} must be 3-D {layout}, got {tuple(tensor.shape)}")
    _check_same_device(tensor, name, state[0], "key_pages")


@torch.library.register_fake("attngate::paged_compact_kv_")
def _paged_compact_kv_fake(key_pages, value_pages, page_table, lengths, free_pages, free_count, keep):
    _check_storage_fake((key_pages, value_pages, page_table, lengths, free_pages, free_count), keep, "keep",
                        "(B, H, L)")


@torch.library.register_fake("attngate::paged_remove_rows_")
def _paged_remove_rows_fake(key_pages, value_pages, page_table, lengths, free_pages, free_count, rows):
    _check_storage_fake((key_pages, value_pages, page_table, lengths, free_pages, free_count), rows, "rows",
                        "(B, H, K)")


@torch.library.register_fake("attngate::paged_decode_attention")
def _paged_decode_attention_fake(query, key_pages, value_pages, page_table, lengths, scale, extra_key=None,
                                 extra_value=None, extra_valid=None, softcap=0.0):
    _check_paged_fake(key_pages, value_pages, page_table, lengths)
    torch._check(query.dim() == 3, lambda: f"query must be 3-D (B, Hq, D), got {tuple(query.shape)}")
    torch._check(query.dtype == key_pages.dtype, lambda: "query must have the dtype of key_pages")
    for tensor, name in ((query, "query"), (extra_key, "extra_key"), (extra_value, "extra_value"),
                         (extra_valid, "extra_valid")):
        if tensor is not None:
            _check_same_device(tensor, name, key_pages, "key_pages")
    return query.new_empty(query.shape).contiguous()


@torch.library.register_fake("attngate::paged_prefill_attention")
def _paged_prefill_attention_fake(query, key_pages, value_pages, page_table, lengths, key, value, keep, valid, window,
                                  scale, extra_key=None, extra_value=None, extra_until=None, softcap=0.0):
    _check_paged_fake(key_pages, value_pages, page_table, lengths)
    torch._check(query.dim() == 4, lambda: f"query must be 4-D (B, Hq, T, D), got {tuple(query.shape)}")
    torch._check(query.dtype == key_pages.dtype, lambda: "query must have the dtype of key_pages")
    for tensor, name in ((query, "query"), (key, "key"), (value, "value"), (keep, "keep"), (valid, "valid"),
                         (extra_key, "extra_key"), (extra_value, "extra_value"), (extra_until, "extra_until")):
        if tensor is not None:
            _check_same_device(tensor, name, key_pages, "key_pages")
    return query.new_empty(query.shape).contiguous()


@torch.library.register_fake("attngate::paged_decode_step_")
def _paged_decode_step_fake(query, key_pages, value_pages, page_table, lengths, free_pages, free_count, key, value,
                            keep, valid, ring_key, ring_value, ring_valid, slot, scale, ring_keep=None, softcap=0.0):
    _check_paged_fake(key_pages, value_pages, page_table, lengths)
    _check_free_fake(key_pages, free_pages, free_count)
    torch._check(query.dim() == 3, lambda: f"query must be 3-D (B, Hq, D), got {tuple(query.shape)}")
    torch._check(query.dtype == key_pages.dtype, lambda: "query must have the dtype of key_pages")
    for tensor, name in ((query, "query"), (key, "key"), (value, "value"), (keep, "keep"), (valid, "valid"),
                         (ring_key, "ring_key"), (ring_value, "ring_value"), (ring_valid, "ring_valid"),
                         (ring_keep, "ring_keep")):
        if tensor is not None:
            _check_same_device(tensor, name, key_pages, "key_pages")
    return query.new_empty(query.shape).contiguous()
