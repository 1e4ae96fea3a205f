"""AttentionGate: the small causal attention that scores, per token and per KV head, whether K/V stay cached."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import AttentionGateConfig
from ..ops.rectangle import gate_flags


class GateOutput(NamedTuple):
    """What one gate call returns.

    probs: ``(B, H, T)`` float32 retention probabilities (differentiable when the gate needs gradients).
    keep: ``(B, H, T)`` bool hard flags (threshold, sinks, padding applied).
    key, value: ``(B, h'_kv, T, d')`` the gate's own K'/V' of these tokens, for its decode cache.
    """

    probs: torch.Tensor
    keep: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the Llama convention; x is (B, heads, T, d), cos/sin are (B, T, d) or (B, 1, T, d)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


class AttentionGate(nn.Module):
    """The Attention-Gate of one decoder layer (docs/design.md, section 1).

    ``Q' = RoPE(x W_q')``, ``K' = RoPE(x W_k')``, ``V' = x W_v'``, ``O' = causal_softmax(Q'K'^T / sqrt(d')) V'``,
    ``p = sigmoid(O' W_g + b_g)`` per KV head of the model, ``keep = p >= threshold`` or a sink position, and
    false on padding. The projection, sigmoid and flags run in the fused ``attngate::gate_flags`` op; when
    gradients are needed the same formula runs in PyTorch so ``probs`` is differentiable.

    Args:
        hidden_size: d, the width of the layer input x.
        num_model_kv_heads: H, the KV heads of the model's attention (one flag per KV head).
        config: the gate settings; ``config.head_dim`` must be set.
    """

    def __init__(self, hidden_size: int, num_model_kv_heads: int, config: AttentionGateConfig) -> None:
        super().__init__()
        if config.head_dim is None:
            raise ValueError("AttentionGate needs config.head_dim (add_attention_gates fills in the model's)")
        self.config = config
        self.num_model_kv_heads = num_model_kv_heads
        d = config.head_dim
        self.q_proj = nn.Linear(hidden_size, config.num_heads * d, bias=False)
        self.k_proj = nn.Linear(hidden_size, config.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(hidden_size, config.num_kv_heads * d, bias=False)
        self.score = nn.Linear(config.num_heads * d, num_model_kv_heads, bias=True)  # W_g, b_g
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W_g near zero and b_g = init_bias (+3: p ~ 0.95), so a fresh gate keeps every token."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
        nn.init.normal_(self.score.weight, std=1e-3)
        nn.init.constant_(self.score.bias, self.config.init_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: Optional[torch.Tensor] = None,
        sin: Optional[torch.Tensor] = None,
        *,
        valid: Optional[torch.Tensor] = None,
        position_offset: int = 0,
        past: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
        positions: Optional[torch.Tensor] = None,
    ) -> GateOutput:
        """Scores the tokens ``x`` ``(B, T, d)``.

        Args:
            x: the post-norm hidden states the layer's q/k/v projections read.
            cos, sin: ``(B, T, d')`` rotary tables for these positions (needed when ``config.rope``).
            valid: ``(B, T)`` bool, False on padding (never kept, never attended to).
            position_offset: tokens seen before ``x`` (for ``sink_tokens``).
            past: the gate's cache of earlier tokens, ``(key, value, key_valid)`` with key/value
                ``(B, h'_kv, P, d')`` and key_valid ``(B, P)`` bool; the gate is causal, so scoring a chunk with
                its past gives the same flags as scoring the whole sequence.
            positions: optional ``(B, T)`` absolute positions for ``sink_tokens`` (per row, e.g. left padding).
        """
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        new_valid = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
        if past is not None:
            keys = torch.cat([past[0], k], dim=2)
            values = torch.cat([past[1], v], dim=2)
            key_valid = torch.cat([past[2], new_valid], dim=1)
        else:
            keys, values, key_valid = k, v, new_valid
        out = self.attention(q, keys, values, None if valid is None and past is None else key_valid)
        probs, keep = self.score_heads(out, valid=valid, position_offset=position_offset, positions=positions)
        return GateOutput(probs, keep, k, v)

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The gate's causal attention: queries ``(B, h', T, d')`` are the last T of the ``P + T`` keys/values
        ``(B, h'_kv, P + T, d')``; ``key_valid`` ``(B, P + T)`` masks padding (None: none). Query t (slot P + t)
        sees keys j <= P + t that are valid and, with ``config.attention_window`` W > 0, j > P + t - W; always itself,
        so a padded query never has an empty row (its flag is forced off anyway)."""
        T, S = q.shape[2], keys.shape[2]
        window = self.config.attention_window
        gqa = self.config.num_heads != self.config.num_kv_heads
        if key_valid is None and (window == 0 or window >= S):  # SDPA's fused causal path, no mask tensor
            return F.scaled_dot_product_attention(q, keys, values, is_causal=T == S, enable_gqa=gqa)
        j = torch.arange(S, device=q.device).view(1, -1)
        i = (torch.arange(T, device=q.device) + S - T).view(-1, 1)
        seen = (j <= i) & (i - j < window) if window > 0 else j <= i
        mask = seen.unsqueeze(0) if key_valid is None else seen.unsqueeze(0) & key_valid.unsqueeze(1)
        mask = mask | (j == i).unsqueeze(0)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.unsqueeze(1), enable_gqa=gqa)

    def project(
        self, x: torch.Tensor, cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q', K', V' of the tokens ``x`` ``(B, T, d)``: ``(B, h', T, d')``, ``(B, h'_kv, T, d')`` twice, RoPE applied.

        One matrix product with the three projections stacked, and one RoPE call for Q' and K' together.
        ``cos``/``sin``: ``(B, T, d')`` or ``(B, 1, T, d')``.
        """
        cfg = self.config
        B, T, _ = x.shape
        d, nq, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        qkv = F.linear(x, self._stacked_qkv_weight()).view(B, T, nq + 2 * nkv, d).transpose(1, 2)
        qk, v = qkv[:, : nq + nkv], qkv[:, nq + nkv :]
        if cfg.rope:
            if cos is None or sin is None:
                raise ValueError("AttentionGate with rope=True needs cos and sin")
            if cos.shape[-2:] != (T, d) or cos.shape[0] != B or sin.shape != cos.shape:
                raise ValueError(f"cos and sin must have shape (B, T, head_dim) = {(B, T, d)}, got "
                                 f"{tuple(cos.shape)} and {tuple(sin.shape)}")
            qk = apply_rope(qk, cos, sin)
        return qk[:, :nq], qk[:, nq:], v

    def _stacked_qkv_weight(self) -> torch.Tensor:
        """``cat(W_q', W_k', W_v')``: rebuilt when a weight changes (or every call while they need gradients)."""
        weights = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return torch.cat(weights)
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in weights)
        if getattr(self, "_stacked_key", None) != key:
            self._stacked = torch.cat([w.detach() for w in weights])
            self._stacked_key = key
        return self._stacked

    def score_heads(
        self,
        attn_out: torch.Tensor,
        *,
        valid: Optional[torch.Tensor] = None,
        position_offset: int = 0,
        positions: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Retention probabilities and keep flags ``(B, H, T)`` from the gate attention output ``(B, h', T, d')``.

        Sinks are taken from ``positions`` ``(B, T)`` when given (left-padded batches: each row has its own
        positions), else from ``position_offset + t``. Padding (``valid`` False) is never kept.
        """
        cfg = self.config
        B, _, T, d = attn_out.shape
        gate_out = attn_out.transpose(1, 2).reshape(B, T, cfg.num_heads * d)
        weight, bias = self.score.weight, self.score.bias
        # With per-row positions the op must not apply sinks itself: they are added below.
        op_sinks = cfg.sink_tokens if positions is None else 0
        if torch.is_grad_enabled() and (gate_out.requires_grad or weight.requires_grad):
            probs = torch.sigmoid(F.linear(gate_out.float(), weight.float(), bias.float())).transpose(1, 2)
            with torch.no_grad():
                _, keep = gate_flags(gate_out.detach(), weight.detach().to(gate_out.dtype),
                                     bias.detach().to(gate_out.dtype), cfg.threshold, op_sinks,
                                     position_offset, valid)
        else:
            if weight.dtype != gate_out.dtype:
                weight, bias = weight.to(gate_out.dtype), bias.to(gate_out.dtype)
            probs, keep = gate_flags(gate_out, weight, bias, cfg.threshold, op_sinks, position_offset, valid)
        if positions is not None and cfg.sink_tokens > 0:
            sink = (positions < cfg.sink_tokens).unsqueeze(1)
            if valid is not None:
                sink = sink & valid.unsqueeze(1)
            keep = keep | sink
        return probs, keep
