"""The eviction rule (docs/design.md, section 2) as boolean masks, and grouped-query attention under such a mask."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def block_visibility(keep: torch.Tensor, valid: Optional[torch.Tensor], window: int) -> torch.Tensor:
    """Which keys of a block each query of the same block may see, per KV head.

    ``visible[b, h, i, j] = j <= i and valid[b, j] and (keep[b, h, j] or i - j < window)``, and every query always
    sees itself (so a padded query never has an empty row; its output is never used).

    Args:
        keep: ``(B, H, T)`` bool gate flags.
        valid: ``(B, T)`` bool, False on padding; None means no padding.
        window: the protected window w >= 1 (``protect_recent``).

    Returns:
        ``(B, H, T, T)`` bool.
    """
    T = keep.shape[-1]
    pos = torch.arange(T, device=keep.device)
    distance = pos.view(-1, 1) - pos.view(1, -1)  # i - j
    causal = distance >= 0
    in_window = causal & (distance < window)
    visible = causal & keep.unsqueeze(2) | in_window
    if valid is not None:
        visible = visible & valid.view(valid.shape[0], 1, 1, T)
    return visible | (distance == 0)


def grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Softmax attention with a per-KV-head boolean mask, for grouped-query attention.

    Args:
        query: ``(B, Hq, T, D)``, Hq a multiple of H; query head q reads KV head ``q // (Hq // H)``.
        key, value: ``(B, H, S, D)``.
        visible: ``(B, H, T, S)`` bool (or ``(B, 1, T, S)`` when it does not depend on the head), at least one True
            per row.
        scale: softmax scale.
        dropout_p: dropout on the attention weights.
        softcap: > 0 soft-caps the scores first, ``softcap * tanh(scale * q.k / softcap)`` (Gemma 2); 0: off.

    Returns:
        ``(B, Hq, T, D)``.
    """
    B, Hq, T, D = query.shape
    H, S = key.shape[1], key.shape[2]
    group = Hq // H
    if softcap > 0.0:
        return _softcapped_attention(query, key, value, visible, scale, dropout_p, softcap)
    if visible.shape[1] == 1 or group == 1:  # the mask is the same for every query head of a group
        return F.scaled_dot_product_attention(query, key, value, attn_mask=visible, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=group > 1)
    # Fold each group's query heads into the query axis so that the mask stays per KV head.
    q = query.reshape(B, H, group * T, D)
    mask = visible.unsqueeze(2).expand(B, H, group, T, S).reshape(B, H, group * T, S)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.reshape(B, Hq, T, D)


def _softcapped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor,
                          scale: float, dropout_p: float, softcap: float) -> torch.Tensor:
    """:func:`grouped_attention` with soft-capped scores (SDPA has no soft-cap): the scores are materialised,
    ``(B, Hq, T, S)``, softmax in float32."""
    B, Hq, T, D = query.shape
    H, S = key.shape[1], key.shape[2]
    group = Hq // H
    q = query.reshape(B, H, group, T, D)
    scores = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2)).float() * scale
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible.view(B, visible.shape[1], 1, T, S), float("-inf"))
    weights = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p).to(value.dtype)
    return torch.matmul(weights, value.unsqueeze(2)).reshape(B, Hq, T, D)
