"""Typed wrappers, docstrings and fake (meta) implementations of the ``torch.ops.attngate`` ops.

The ops themselves are registered in C++ (``csrc/ops.cpp`` holds every schema); this module only adds what
``torch.compile`` needs to trace them (``register_fake``) and a documented Python entry point per op.

Cache layout for one layer, shared by every op:

* ``key_cache``, ``value_cache``: ``(B, H, C, D)``, H KV heads, capacity C rows per head, last dimension
  contiguous (other strides free), float32 / float16 / bfloat16.
* ``lengths``: ``(B, H)`` int32; rows ``[0, lengths[b, h])`` of head ``(b, h)`` are live, the rest are free.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch

_ops = torch.ops.attngate


def gate_flags(
    gate_out: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    threshold: float = 0.5,
    sink_tokens: int = 0,
    position_offset: int = 0,
    valid: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores the gate and makes the keep flags, fused in one kernel.

    Args:
        gate_out: ``(B, T, G)`` output of the gate's small attention, float32/float16/bfloat16.
        weight: ``(H, G)`` gate projection, one row per KV head of the model, dtype of ``gate_out``.
        bias: optional ``(H,)``, dtype of ``weight``.
        threshold: a token is kept where its probability is ``>= threshold`` (not NaN).
        sink_tokens: positions ``position_offset + t < sink_tokens`` are always kept.
        position_offset: absolute position of ``t = 0`` (the number of tokens seen before this chunk).
        valid: optional ``(B, T)`` bool; ``False`` (padding) forces ``keep = False``, overriding sinks.

    Returns:
        ``probs``: ``(B, H, T)`` float32 ``sigmoid(gate_out @ weight.T + bias)``, head-major like the cache;
        ``keep``: ``(B, H, T)`` bool.
    """
    return _ops.gate_flags(gate_out, weight, bias, threshold, sink_tokens, position_offset, valid)


def append_kv_(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    lengths: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: Optional[torch.Tensor] = None,
) -> None:
    """Appends new tokens to the gated cache, in place.

    For every ``(b, h)`` the rows of ``key``/``value`` ``(B, H, T, D)`` whose ``keep`` ``(B, H, T)`` is true
    (all rows when ``keep`` is None) are written, in order, from row ``lengths[b, h]`` on, and
    ``lengths[b, h]`` grows by their count. If any head would pass the capacity C (or has a length outside
    ``[0, C]``) the call raises and writes nothing.
    """
    _ops.append_kv_(key_cache, value_cache, lengths, key, value, keep)


def compact_kv_(key_cache: torch.Tensor, value_cache: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor) -> None:
    """Prunes a filled cache in place with any policy's flags.

    ``keep`` is ``(B, H, L)`` bool with ``L >= max(lengths)``. For every ``(b, h)`` the live rows whose flag is
    true move, in their original order, to the front and ``lengths[b, h]`` becomes their count. Rows past the
    new length are unspecified. No second full-size buffer is allocated.
    """
    _ops.compact_kv_(key_cache, value_cache, lengths, keep)


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query token per head over each KV head's live rows.

    ``query`` is ``(B, Hq, D)`` with Hq a multiple of H (query head q reads KV head ``q // (Hq // H)``).
    Softmax of ``scale * q.k`` over rows ``[0, lengths[b, h])``, accumulated in float32. Returns ``(B, Hq, D)``
    in the query's dtype; a head with no live row gives zeros.
    """
    return _ops.decode_attention(query, key_cache, value_cache, lengths, scale)


def set_sync_checks(enabled: bool) -> bool:
    """Turns the CUDA ops' host read-back of device-side value checks on or off; returns the previous setting.

    Shape, dtype and device checks always run on the host. Checks on *values* that live on the GPU (lengths in
    ``[0, C]``, capacity overflow in :func:`append_kv_`) are evaluated by the kernels, which then write nothing.
    With sync checks on (the default) the op reads that 4-byte status back and raises, costing one host
    synchronisation; with them off, or while a CUDA graph is captured, a failing call is a silent no-op.
    CPU ops always raise.
    """
    return _ops.set_sync_checks(enabled)


@contextlib.contextmanager
def sync_checks(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_sync_checks`."""
    previous = set_sync_checks(enabled)
    try:
        yield
    finally:
        set_sync_checks(previous)


def cuda_kernels_available() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("attngate::gate_flags", "CUDA")


# ---------------------------------------------------------------------------------------------------------
# Fake implementations: shape/dtype/device contracts for tracing (torch.compile, FakeTensor, meta).
# ---------------------------------------------------------------------------------------------------------


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


@torch.library.register_fake("attngate::append_kv_")
def _append_kv_fake(key_cache, value_cache, lengths, key, value, keep):
    _check_cache_fake(key_cache, value_cache, lengths)
    torch._check(key.dim() == 4, lambda: f"key must be 4-D (B, H, T, D), got {tuple(key.shape)}")
    torch._check(value.shape == key.shape, lambda: "value must have the shape of key")
    for tensor, name in ((key, "key"), (value, "value"), (keep, "keep")):
        if tensor is not None:
            _check_same_device(tensor, name, key_cache, "key_cache")
    return None


@torch.library.register_fake("attngate::compact_kv_")
def _compact_kv_fake(key_cache, value_cache, lengths, keep):
    _check_cache_fake(key_cache, value_cache, lengths)
    torch._check(keep.dim() == 3, lambda: f"keep must be 3-D (B, H, L), got {tuple(keep.shape)}")
    _check_same_device(keep, "keep", key_cache, "key_cache")
    return None


@torch.library.register_fake("attngate::decode_attention")
def _decode_attention_fake(query, key_cache, value_cache, lengths, scale):
    _check_cache_fake(key_cache, value_cache, lengths)
    torch._check(query.dim() == 3, lambda: f"query must be 3-D (B, Hq, D), got {tuple(query.shape)}")
    torch._check(query.dtype == key_cache.dtype, lambda: "query must have the dtype of key_cache")
    _check_same_device(query, "query", key_cache, "key_cache")
    return query.new_empty(query.shape).contiguous()
