"""Training attention (docs/training.md): gate flags as multiplicative weights, computed in query blocks.

``A_ij = m_ij exp(s_ij) / sum_j' m_ij' exp(s_ij')`` with ``m_ij = 0`` for ``j > i`` or padding, ``1`` inside the
protected window (``i - j < w``), and ``F_j`` (per KV head) otherwise. ``F = f + p - p.detach()`` carries the
hard flag forward and the sigmoid's gradient backward, so an evicted key (``F_j = 0``) still receives
``dL/dF_j``: how much keeping it would have helped. With a soft-cap c (Gemma 2) ``s_ij = c tanh(scale q.k / c)``.

Memory: like flash attention, nothing of size T x T is kept for backward. The forward keeps the output and one
log-sum-exp per query and head; both passes work on blocks of ``block_size`` queries, so the peak extra memory
is a few float32 tensors of ``B * Hq * block_size * T`` (4 MiB per batch row and query head at T = 2048,
block_size = 128), instead of ``B * Hq * T * T`` per layer for an autograd graph of the plain formula.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def _block_weights(
    q: torch.Tensor, key: torch.Tensor, retain: torch.Tensor, valid: Optional[torch.Tensor], start: int, window: int,
    scale: float, softcap: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Scores and multiplicative weights of queries ``[start, start + Tq)`` against keys ``[0, start + Tq)``.

    q: ``(B, H, G, Tq, D)`` float32; key ``(B, H, S, D)`` float32 with S = start + Tq; retain ``(B, H, S)``.
    Returns ``(scores (B,H,G,Tq,S) with -inf above the diagonal, m (B,H,1,Tq,S), gated (B,H,1,Tq,S) bool:
    where m is F_j, slope)``: with ``softcap > 0`` the scores are ``softcap * tanh(scale * q.k / softcap)`` and
    ``slope`` ``(B,H,G,Tq,S)`` is their derivative by ``scale * q.k`` (``1 - tanh^2``), else None.
    """
    Tq, S = q.shape[3], key.shape[2]
    i = torch.arange(start, start + Tq, device=q.device).view(-1, 1)
    j = torch.arange(S, device=q.device).view(1, -1)
    distance = i - j
    causal = distance >= 0
    scores = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2)) * scale
    slope = None
    if softcap > 0.0:
        capped = torch.tanh(scores / softcap)
        slope = 1.0 - capped * capped
        scores = softcap * capped
    scores = scores.masked_fill(~causal, float("-inf"))
    gated = distance >= window  # implies causal
    if valid is not None:
        key_valid = valid.view(valid.shape[0], 1, 1, 1, S)
        gated = gated & key_valid
        inside = causal & (distance < window) & key_valid | (distance == 0)
    else:
        inside = causal & (distance < window)
    gated = gated.expand(retain.shape[0], retain.shape[1], 1, Tq, S)
    m = torch.where(gated, retain.view(retain.shape[0], retain.shape[1], 1, 1, S), inside.to(retain.dtype))
    return scores, m, gated, slope


class _STEGatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, retain, valid, window: int, scale: float, block_size: int, softcap: float):
        B, Hq, T, D = query.shape
        H = key.shape[1]
        G = Hq // H
        qf = query.float().view(B, H, G, T, D)
        kf, vf, rf = key.float(), value.float(), retain.float()
        out = torch.empty(B, H, G, T, D, dtype=torch.float32, device=query.device)
        lse = torch.empty(B, H, G, T, dtype=torch.float32, device=query.device)
        for start in range(0, T, block_size):
            stop = min(start + block_size, T)
            scores, m, _, _ = _block_weights(qf[:, :, :, start:stop], kf[:, :, :stop], rf[..., :stop],
                                             None if valid is None else valid[:, :stop], start, window, scale,
                                             softcap)
            peak = scores.amax(dim=-1, keepdim=True)
            weights = m * torch.exp(scores - peak)
            total = weights.sum(dim=-1, keepdim=True)
            out[:, :, :, start:stop] = torch.matmul(weights / total, vf[:, :, None, :stop])
            lse[:, :, :, start:stop] = (peak + torch.log(total)).squeeze(-1)
        ctx.save_for_backward(query, key, value, retain, valid, out, lse)
        ctx.window, ctx.scale, ctx.block_size, ctx.softcap = window, scale, block_size, softcap
        return out.view(B, Hq, T, D).to(query.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, retain, valid, out, lse = ctx.saved_tensors
        window, scale, block_size = ctx.window, ctx.scale, ctx.block_size
        B, Hq, T, D = query.shape
        H = key.shape[1]
        G = Hq // H
        qf = query.float().view(B, H, G, T, D)
        kf, vf, rf = key.float(), value.float(), retain.float()
        dout = grad_out.float().reshape(B, H, G, T, D)
        delta = (dout * out).sum(dim=-1)  # D_i = dO_i . O_i
        dq = torch.zeros_like(qf)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        dretain = torch.zeros_like(rf)
        for start in range(0, T, block_size):
            stop = min(start + block_size, T)
            q_blk = qf[:, :, :, start:stop]
            scores, m, gated, slope = _block_weights(q_blk, kf[:, :, :stop], rf[..., :stop],
                                                     None if valid is None else valid[:, :stop], start, window, scale,
                                                     ctx.softcap)
            # e_hat = exp(s - lse): the attention weight the key would have with m = 1 (0 above the diagonal).
            e_hat = torch.exp(scores - lse[:, :, :, start:stop, None])
            probs = m * e_hat
            dprobs = torch.matmul(dout[:, :, :, start:stop], vf[:, :, None, :stop].transpose(-1, -2))
            centred = dprobs - delta[:, :, :, start:stop, None]
            dscores = probs * centred * scale
            if slope is not None:  # through the soft-cap: d(c tanh(s / c)) / ds = 1 - tanh^2
                dscores = dscores * slope
            dq[:, :, :, start:stop] = torch.matmul(dscores, kf[:, :, None, :stop])
            dk[:, :, :stop] += torch.matmul(dscores.transpose(-1, -2), q_blk).sum(dim=2)
            dv[:, :, :stop] += torch.matmul(probs.transpose(-1, -2), dout[:, :, :, start:stop]).sum(dim=2)
            if ctx.needs_input_grad[3]:
                dm = (e_hat * centred).sum(dim=2, keepdim=True)  # summed over the group's query heads
                dretain[..., :stop] += (dm * gated).sum(dim=3).squeeze(2)
        return (dq.view(B, Hq, T, D).to(query.dtype), dk.to(key.dtype), dv.to(value.dtype),
                dretain.to(retain.dtype) if ctx.needs_input_grad[3] else None, None, None, None, None, None)


def ste_gated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    retain: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    window: int = 1,
    scale: Optional[float] = None,
    block_size: int = 128,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal grouped-query attention with per-key multiplicative retention weights (docs/training.md).

    Args:
        query: ``(B, Hq, T, D)``; key, value: ``(B, H, T, D)`` with H dividing Hq (query head q reads KV head
            ``q // (Hq // H)``).
        retain: ``(B, H, T)`` the weights ``F`` of each key per KV head (the straight-through flags in training;
            any values in [0, 1] work). Differentiable.
        valid: ``(B, T)`` bool, False on padding keys (never attended to; a padded query attends to itself only).
        window: w; keys with ``i - j < w`` get weight 1 whatever their flag.
        scale: softmax scale (default ``D ** -0.5``).
        block_size: queries per block (memory/speed trade-off, see the module docstring).
        softcap: > 0 soft-caps the scores, ``softcap * tanh(scale * q.k / softcap)`` (Gemma 2); 0: off.

    Returns:
        ``(B, Hq, T, D)`` in the query's dtype; computed in float32.
    """
    B, Hq, T, D = query.shape
    if key.dim() != 4 or key.shape[0] != B or key.shape[2] != T or key.shape[3] != D or Hq % key.shape[1] != 0:
        raise ValueError(f"key must be (B, H, T, D) with H dividing Hq; query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}")
    if value.shape != key.shape:
        raise ValueError(f"value must have the shape of key {tuple(key.shape)}, got {tuple(value.shape)}")
    if retain.shape != (B, key.shape[1], T):
        raise ValueError(f"retain must have shape (B, H, T) = {(B, key.shape[1], T)}, got {tuple(retain.shape)}")
    if valid is not None and tuple(valid.shape) != (B, T):
        raise ValueError(f"valid must have shape (B, T) = {(B, T)}, got {tuple(valid.shape)}")
    if window < 1 or block_size < 1:
        raise ValueError(f"window and block_size must be >= 1, got {window} and {block_size}")
    if not softcap >= 0.0 or softcap == float("inf"):
        raise ValueError(f"softcap must be finite and >= 0, got {softcap}")
    scale = D**-0.5 if scale is None else scale
    return _STEGatedAttention.apply(query, key, value, retain, None if valid is None else valid.bool(), window,
                                    scale, block_size, float(softcap))
