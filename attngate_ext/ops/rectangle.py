"""Typed wrappers and docstrings of the rectangle ``torch.ops.attngate`` ops (and of ``gate_flags``).

The ops themselves are registered in C++ (``csrc/ops.cpp`` holds every schema); their fakes for ``torch.compile``
are in :mod:`attngate_ext.ops.fakes`, their pure-PyTorch twins in :mod:`attngate_ext.ops.reference`.

Rectangle cache layout for one layer, shared by these ops:

* ``key_cache``, ``value_cache``: ``(B, H, C, D)``, H KV heads, capacity C rows per head, last dimension
  contiguous (other strides free), float32 / float16 / bfloat16.
* ``lengths``: ``(B, H)`` int32; rows ``[0, lengths[b, h])`` of head ``(b, h)`` are live, the rest are free.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

_ops = torch.ops.attngate


def gate_flags(gate_out: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               threshold: float = 0.5, sink_tokens: int = 0, position_offset: int = 0,
               valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
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


def append_kv_(key_cache: torch.Tensor, value_cache: torch.Tensor, lengths: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
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


def decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float, softcap: float = 0.0) -> torch.Tensor:
    """Attention of one query token per head over each KV head's live rows.

    ``query`` is ``(B, Hq, D)`` with Hq a multiple of H (query head q reads KV head ``q // (Hq // H)``).
    Softmax of ``scale * q.k`` over rows ``[0, lengths[b, h])``, accumulated in float32 (with ``softcap > 0`` the
    scores are ``softcap * tanh(scale * q.k / softcap)``, Gemma 2's soft-capping). Returns ``(B, Hq, D)`` in the
    query's dtype; a head with no live row gives zeros.
    """
    return _ops.decode_attention(query, key_cache, value_cache, lengths, scale, softcap)
