"""Future-attention targets: how much a token will matter to the queries that can only see it if it is kept.

A gate with window w decides whether token j stays once it leaves the window, i.e. for the queries ``i >= j + w``.
The target of token j in KV head g is (a KVzip+-style score, computed on the frozen model with every token kept)

    s_j = max over queries i >= j + w and over the query heads h of group g of  a_hij * ||W_o^h v_j|| / ||x_i||

with ``a_hij`` the attention weight, ``W_o^h v_j`` what the token adds to the layer's output through head h, and
``x_i`` the layer input of the query (so scores are comparable across layers and heads, and one threshold can
serve them all). The gate is trained to predict ``log s_j`` from the layer input it reads anyway; no gradient goes
through the model, so a training step costs one no-grad forward.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..gate.gate import AttentionGate

FLOOR = 1e-12  # scores below it (tokens no query outside the window attends to) are clamped: log FLOOR ~ -27.6


@torch.no_grad()
def future_attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    o_weight: torch.Tensor,
    hidden: torch.Tensor,
    valid: Optional[torch.Tensor],
    window: int,
    scale: float,
    block_size: int = 256,
    softcap: float = 0.0,
) -> torch.Tensor:
    """``log s_j`` ``(B, H, T)`` float32 (see the module docstring).

    Args:
        query: ``(B, Hq, T, D)`` post-RoPE queries; key, value: ``(B, H, T, D)`` (key post-RoPE).
        o_weight: the attention's output projection weight ``(d_model, Hq * D)``.
        hidden: ``(B, T, d_model)`` the layer input (the queries' x).
        valid: ``(B, T)`` bool, False on padding (never a query, never a key); None: no padding.
        window: the protected window w >= 1; queries with ``i - j < w`` see token j anyway and do not count.
        scale: the attention's softmax scale.
        block_size: queries per block (peak memory ``B * Hq * block_size * T`` floats).
        softcap: the attention's soft-cap (Gemma 2; 0: none), applied to the scores as the model does.
    """
    B, Hq, T, D = query.shape
    H = key.shape[1]
    G = Hq // H
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=query.device)
    q = query.float().view(B, H, G, T, D)
    k = key.float()
    # ||W_o^h v_j|| for every query head h and token j: (B, H, G, T).
    wo = o_weight.float().view(o_weight.shape[0], Hq, D).permute(1, 2, 0).reshape(H, G, D, -1)
    vnorm = torch.einsum("bhtd,hgdm->bhgtm", value.float(), wo).norm(dim=-1)
    xnorm = hidden.float().norm(dim=-1).clamp_min(1e-6)  # (B, T)
    best = torch.zeros(B, H, G, T, device=query.device)
    j = torch.arange(T, device=query.device)
    for start in range(0, T, block_size):
        stop = min(start + block_size, T)
        i = torch.arange(start, stop, device=query.device).view(-1, 1)
        scores = torch.matmul(q[:, :, :, start:stop], k.unsqueeze(2).transpose(-1, -2)) * scale  # (B,H,G,Tq,T)
        if softcap > 0.0:
            scores = softcap * torch.tanh(scores / softcap)
        visible = (j.view(1, -1) <= i) & valid.view(B, 1, 1, 1, T)
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        far = (i - j.view(1, -1) >= window) & valid[:, start:stop].view(B, 1, 1, -1, 1)
        contribution = probs * far / xnorm[:, start:stop].view(B, 1, 1, -1, 1)
        best = torch.maximum(best, contribution.amax(dim=3))
    best = best * vnorm
    return torch.log(best.amax(dim=2).clamp_min(FLOOR))


def trainable_tokens(valid: Optional[torch.Tensor], shape: Tuple[int, int], window: int, sinks: int,
                     min_future: int, device: torch.device) -> torch.Tensor:
    """``(B, T)`` bool: tokens whose target is trusted: valid, not a sink (always kept), and seen by at least
    ``min_future`` queries outside the window (the target of a token near the end of a training sequence
    would be a max over too few queries)."""
    B, T = shape
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=device)
    position = valid.long().cumsum(dim=1) - 1
    count = valid.sum(dim=1, keepdim=True)
    return valid & (position >= sinks) & (count - position - window >= min_future)


def gate_logits(gate: AttentionGate, hidden: torch.Tensor, cos: Optional[torch.Tensor],
                sin: Optional[torch.Tensor]) -> torch.Tensor:
    """The gate's logits ``(B, H, T)`` (before the sigmoid) for right-padded or unpadded ``hidden`` ``(B, T, d)``:
    with right padding a valid query sees only valid keys under the causal mask, so no padding mask is needed."""
    q, k, v = gate.project(hidden, cos, sin)
    out = gate.attention(q, k, v)
    B, _, T, d = out.shape
    return gate.score(out.transpose(1, 2).reshape(B, T, -1)).transpose(1, 2)


def regression_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the gate's logits and the log-scores over the ``(B, T)`` mask (every head)."""
    weight = mask.unsqueeze(1).expand_as(logits).to(logits.dtype)
    return ((logits.float() - target) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)


def log_floor() -> float:
    """``log`` of the score floor: the target of a token no query outside the window attends to."""
    return math.log(FLOOR)
