"""GatedAttention: an attention block with an Attention-Gate in front, as a drop-in ``self_attn``."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..cache.policy import TokenPolicy
from ..gate.gate import AttentionGate, GateOutput
from ..gate.masks import block_visibility, grouped_attention
from ..gate.ste_attention import ste_gated_attention
from .families import LLAMA, AttentionFamily
from .wrapped_attention import PADDING_MASK_KWARG, PROMPT_LENGTH_KWARG, WrappedAttention, rule_attention

__all__ = ["GatedAttention", "PADDING_MASK_KWARG", "PROMPT_LENGTH_KWARG", "rule_attention"]


class GatedAttention(WrappedAttention):
    """Wraps one attention module of a supported family (:mod:`.families`: q/k/v/o projections, RoPE, GQA, and the
    family's q/k norms, fused projection or soft-capping).

    The wrapped module keeps its weights and is restored by :func:`attngate_ext.remove_attention_gates`. The
    forward computes the model's q/k/v exactly as the wrapped module does, scores the tokens with ``gate`` and
    attends under the eviction rule (docs/design.md, section 2): with an :class:`AttnGateCache` only kept rows are
    stored; without a cache the same rule runs over the whole sequence inside the attention kernel.

    In training mode with autograd on and trainable gate parameters, the forward always takes the straight-through
    path (hard flags forward, the sigmoid's gradient backward) and ignores an empty cache, whatever ``use_cache``
    says, so a standard training loop (``model(ids, labels=ids).loss.backward()``, ``transformers.Trainer``) trains
    the gates; continuing from a cache that already holds tokens is then an error.
    """

    def __init__(
        self, attention: nn.Module, gate: AttentionGate, rope_theta: float, sliding_window: Optional[int] = None,
        family: AttentionFamily = LLAMA,
    ) -> None:
        super().__init__(attention, family)
        self.gate = gate
        self.sliding_window = sliding_window
        gate_dim = gate.config.head_dim
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, gate_dim, 2, dtype=torch.float32) / gate_dim))
        self.register_buffer("gate_inv_freq", inv_freq, persistent=False)
        # Decides the flags instead of the gate (a baseline, or a teacher that keeps every token); None: the gate.
        self.policy: Optional[TokenPolicy] = None
        # Of the last call, for losses and statistics: probs/keep, the retention weights F (differentiable in
        # training) and the padding mask.
        self.last_gate: Optional[GateOutput] = None
        self._retain_dtype: Optional[torch.dtype] = None
        self.last_retain: Optional[torch.Tensor] = None
        self.last_valid: Optional[torch.Tensor] = None
        # The gate's RoPE tables of the current forward; add_attention_gates makes the layers of a model share one.
        self.rope_memo: Dict[str, Any] = {}

    @property
    def last_retain(self) -> Optional[torch.Tensor]:
        """The retention weights ``F`` ``(B, H, T)`` of the last forward (differentiable while training the gates);
        after a cached (inference) forward, the hard flags in the query dtype."""
        if self._last_retain is None and self.last_gate is not None and self._retain_dtype is not None:
            return self.last_gate.keep.to(self._retain_dtype)
        return self._last_retain

    @last_retain.setter
    def last_retain(self, value: Optional[torch.Tensor]) -> None:
        self._last_retain = value

    def _valid(self, padding_mask: Optional[torch.Tensor], T: int) -> Optional[torch.Tensor]:
        """``(B, T)`` bool, False on padding, from the model's 2-D mask (shared through ``rope_memo`` like the
        RoPE tables: every layer of a forward gets the same mask)."""
        if padding_mask is None:
            return None
        memo = self.rope_memo
        if memo.get("mask") is not padding_mask or memo.get("mask_meta") != (padding_mask._version, T):
            memo.update(mask=padding_mask, mask_meta=(padding_mask._version, T),
                        valid=padding_mask[:, -T:].to(torch.bool))
        return memo["valid"]

    def gate_rope(self, hidden: torch.Tensor, position_embeddings, position_ids) -> Tuple[torch.Tensor, ...]:
        """The gate's RoPE tables ``(B, 1, T, d')``; computed once per forward and shared by the layers that share
        ``rope_memo`` (they depend only on the positions, which every layer of a forward gets as one tensor)."""
        B, T, _ = hidden.shape
        if not self.gate.config.rope:
            return None, None
        # The gate reuses the model's tables when they have its width (then it follows the model's RoPE variant:
        # llama3 or YaRN scaling, Gemma 3's global base); otherwise it builds plain ones from rope_theta.
        shares = position_embeddings is not None and position_embeddings[0].shape[-1] == self.gate.config.head_dim
        source = position_embeddings[0] if shares else position_ids
        if source is None:
            raise ValueError("a gate whose head_dim differs from the model's RoPE width needs position_ids for its "
                             "RoPE")
        memo = self.rope_memo
        meta = (source._version, hidden.dtype, B, T)
        if memo.get("source") is source and memo.get("meta") == meta:
            return memo["tables"]
        if shares:
            cos, sin = position_embeddings
            tables = cos.expand(B, T, -1).unsqueeze(1), sin.expand(B, T, -1).unsqueeze(1)
        else:
            freqs = position_ids.to(torch.float32).unsqueeze(-1) * self.gate_inv_freq
            emb = torch.cat([freqs, freqs], dim=-1).expand(B, T, -1).unsqueeze(1)
            tables = emb.cos().to(hidden.dtype), emb.sin().to(hidden.dtype)
        memo.update(source=source, meta=meta, tables=tables)
        return tables

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[Any] = None,
        past_key_values: Optional[Any] = None,
        **kwargs: Any,
    ) -> Tuple[torch.Tensor, None]:
        """Same signature and result as the wrapped attention (``(output, None)``; weights are not returned).

        ``attention_mask`` (the model's 4-D mask) is ignored: padding comes from the 2-D mask the gated model's
        hook passes as ``gate_padding_mask``, and causality and eviction from the rule itself.
        """
        cache = self.gated_cache(cache, past_key_values)
        padding_mask = kwargs.get(PADDING_MASK_KWARG)
        position_ids = kwargs.get("position_ids")
        B, T, _ = hidden_states.shape
        valid = self._valid(padding_mask, T)
        gate_cos, gate_sin = self.gate_rope(hidden_states, position_embeddings, position_ids)
        if position_ids is not None:
            position_ids = position_ids.expand(B, T)

        query, key, value = self.project(hidden_states, position_embeddings)
        dropout = self.attention.attention_dropout if self.training else 0.0

        if cache is not None and self._training_gates():
            # A standard training loop leaves use_cache at the model's default (True). The cache keeps hard flags
            # only, so the gates would get no gradient: train through the straight-through path instead.
            if cache.get_seq_length(self.layer_idx) > 0:
                raise ValueError("a gated model in training mode with trainable gates cannot continue from a cache "
                                 "that already holds tokens; call model.eval() (or freeze the gates) to decode")
            cache = None
        if cache is not None:
            layer = cache.layer(self.layer_idx)
            self._check_window(layer.get_seq_length() + T)
            # Inference: the cached path applies no attention dropout.
            out, probs, keep = layer.attend(query, key, value, hidden_states, self.gate, gate_cos, gate_sin, valid,
                                            position_ids, self.scaling, self.policy, softcap=self.softcap)
            self.last_gate = GateOutput(probs, keep, None, None)
            self.last_retain, self.last_valid = None, valid  # the property converts last_gate.keep when asked
            self._retain_dtype = query.dtype
        else:
            if self.policy is not None and self.policy.prunes_cache:
                raise ValueError("a policy that prunes the cache between chunks (H2O, SnapKV in context) needs a "
                                 "cache: call the model with use_cache=True")
            self._check_window(T)
            if self.policy is not None:
                keep = self.policy.keep_flags(valid if valid is not None else torch.ones(B, T, dtype=torch.bool,
                                              device=query.device), position_ids, key.shape[1])
                if valid is not None:
                    keep = keep & valid.unsqueeze(1)
                gate = GateOutput(keep.float(), keep, None, None)
            else:
                gate = self.gate(hidden_states, gate_cos, gate_sin, valid=valid, positions=position_ids)
            keep = gate.keep
            prompt_length = kwargs.get(PROMPT_LENGTH_KWARG)
            if prompt_length is not None and not self.gate.config.decode_gating:
                generated = torch.arange(T, device=keep.device) >= prompt_length
                keep = torch.where(generated, valid.unsqueeze(1) if valid is not None else True, keep)
            window = self.gate.config.protect_recent
            self.last_gate, self.last_valid = GateOutput(gate.probs, keep, None, None), valid
            if gate.probs.requires_grad:
                # Training (docs/training.md): hard flags forward, the sigmoid's gradient backward, applied as
                # multiplicative weights so that evicted keys still get a gradient. Forced keeps (sinks,
                # decode_gating=False tokens) carry no gradient.
                probs = gate.probs.to(query.dtype)
                forced = keep & (gate.probs < self.gate.config.threshold)
                retain = torch.where(forced, torch.ones_like(probs), keep.to(probs.dtype) + probs - probs.detach())
                self.last_retain = retain
                out = ste_gated_attention(query, key, value, retain, valid, window, self.scaling,
                                          softcap=self.softcap)
            elif dropout > 0.0:
                self.last_retain = keep.to(query.dtype)
                visible = block_visibility(keep, valid, window)
                out = grouped_attention(query, key, value, visible, self.scaling, dropout, self.softcap)
            else:  # the rule inside the attention kernel (an empty paged cache): no T x T mask
                self.last_retain = keep.to(query.dtype)
                out = rule_attention(query, key, value, keep, valid, window, self.scaling, self.softcap)
        return self.output(out), None

    def _training_gates(self) -> bool:
        """Training mode, autograd on and a gate parameter that needs a gradient: the straight-through path."""
        return (self.training and torch.is_grad_enabled() and self.policy is None
                and any(p.requires_grad for p in self.gate.parameters()))

    def _check_window(self, total: int) -> None:
        if self.sliding_window is not None and total > self.sliding_window:
            raise NotImplementedError(
                f"layer {self.layer_idx} uses sliding-window attention ({self.sliding_window} tokens); gated "
                f"attention implements full attention only, so sequences are limited to {self.sliding_window} "
                f"tokens (got {total})"
            )
