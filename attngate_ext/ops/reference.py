"""Pure-PyTorch references for every ``torch.ops.attngate`` op, same names and same semantics.

They are written for clarity, not speed (Python loops over (batch, head)), and are what the tests compare the
C++/CUDA kernels against. Mutating references mutate their arguments in place exactly like the ops.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def gate_flags(
    gate_out: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    threshold: float,
    sink_tokens: int,
    position_offset: int,
    valid: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """probs = sigmoid(gate_out @ weight^T + bias) as (B, H, T) float32; keep = probs >= threshold,
    forced true where position_offset + t < sink_tokens, forced false where valid is false."""
    logits = gate_out.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    probs = torch.sigmoid(logits).transpose(1, 2).contiguous()  # (B, H, T)
    keep = probs >= threshold
    T = gate_out.shape[1]
    positions = torch.arange(T, device=gate_out.device) + position_offset
    keep = keep | (positions < sink_tokens).view(1, 1, T)
    if valid is not None:
        keep = keep & valid.unsqueeze(1)
    return probs, keep


def append_kv_(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    lengths: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: Optional[torch.Tensor],
) -> None:
    """Writes the kept rows of key/value (B, H, T, D), in order, at row lengths[b, h] of each head."""
    B, H, C, _ = key_cache.shape
    T = key.shape[2]
    if keep is None:
        keep = torch.ones(B, H, T, dtype=torch.bool, device=key.device)
    counts = keep.sum(dim=2).to(torch.int64)
    start = lengths.to(torch.int64)
    if bool(((start < 0) | (start > C)).any()):
        raise RuntimeError("append_kv_: lengths must lie in [0, C]")
    if bool((start + counts > C).any()):
        raise RuntimeError("append_kv_: capacity overflow")
    for b in range(B):
        for h in range(H):
            n = int(counts[b, h])
            s = int(start[b, h])
            key_cache[b, h, s : s + n] = key[b, h][keep[b, h]]
            value_cache[b, h, s : s + n] = value[b, h][keep[b, h]]
    lengths.add_(counts.to(lengths.dtype))


def compact_kv_(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    lengths: torch.Tensor,
    keep: torch.Tensor,
) -> None:
    """Moves each head's live rows whose keep is true, in order, to the front; lengths = their count."""
    B, H, C, _ = key_cache.shape
    if bool(((lengths < 0) | (lengths > C)).any()):
        raise RuntimeError("compact_kv_: lengths must lie in [0, C]")
    if B * H > 0 and int(lengths.max()) > keep.shape[2]:
        raise RuntimeError("compact_kv_: keep must cover every live row")
    for b in range(B):
        for h in range(H):
            n = int(lengths[b, h])
            rows = keep[b, h, :n].nonzero().flatten()
            m = rows.numel()
            key_cache[b, h, :m] = key_cache[b, h, rows].clone()
            value_cache[b, h, :m] = value_cache[b, h, rows].clone()
            lengths[b, h] = m


def soft_cap(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """``softcap * tanh(scores / softcap)`` (Gemma 2's attention logit soft-capping); the scores as they are when
    ``softcap`` is 0."""
    return softcap * torch.tanh(scores / softcap) if softcap > 0 else scores


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Softmax attention of query (B, Hq, D) over each KV head's live rows, in float32; zeros for empty heads.
    With ``softcap > 0`` the scores are soft-capped first: ``softcap * tanh(score / softcap)``."""
    B, H, C, D = key_cache.shape
    Hq = query.shape[1]
    group = Hq // H
    k = key_cache.float().repeat_interleave(group, dim=1)  # (B, Hq, C, D)
    v = value_cache.float().repeat_interleave(group, dim=1)
    scores = soft_cap(torch.einsum("bqd,bqcd->bqc", query.float(), k) * scale, softcap)
    live = torch.arange(C, device=query.device).view(1, 1, C) < lengths.repeat_interleave(group, dim=1).unsqueeze(-1)
    scores = scores.masked_fill(~live, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty head has all -inf: zeros
    out = torch.einsum("bqc,bqcd->bqd", probs, v)
    return out.to(query.dtype)


def ste_gated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    retain: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    window: int = 1,
    scale: Optional[float] = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """The training formula (docs/training.md) as written, ``A = m e^s / sum m e^s``, with a full T x T
    autograd graph (``softcap > 0``: ``s`` soft-capped)."""
    B, Hq, T, D = query.shape
    group = Hq // key.shape[1]
    scale = D**-0.5 if scale is None else scale
    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    f = retain.float().repeat_interleave(group, dim=1)  # (B, Hq, T)
    scores = soft_cap(torch.einsum("bqid,bqjd->bqij", query.float(), k) * scale, softcap)
    i = torch.arange(T, device=query.device).view(-1, 1)
    j = torch.arange(T, device=query.device).view(1, -1)
    m = torch.where(i - j < window, torch.ones_like(f).unsqueeze(2), f.unsqueeze(2))  # (B, Hq, T, T)
    m = m * (j <= i)
    if valid is not None:
        m = m * valid.view(B, 1, 1, T) + (i == j) * ~valid.view(B, 1, 1, T)  # a padded query sees itself
    scores = scores.masked_fill(j > i, float("-inf"))
    weights = m * torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    out = torch.einsum("bqij,bqjd->bqid", weights / weights.sum(dim=-1, keepdim=True), v)
    return out.to(query.dtype)
