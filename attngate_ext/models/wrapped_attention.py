"""What the two ``self_attn`` wrappers share: the wrapped block's own query/key/value (its family), scale, soft-cap
and output projection, the keywords the gated model's hook passes down, and the eviction rule without a cache.

:class:`~.gated_attention.GatedAttention` wraps the layers that carry a gate, :class:`~.window_attention.
WindowAttention` the sliding-window layers left ungated.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn as nn

from ..cache.cache import AttnGateCache
from ..ops.paged import paged_prefill_attention
from .families import QKV, AttentionFamily

# Keyword the gated model's pre-forward hook uses to hand the 2-D padding mask down to every layer.
PADDING_MASK_KWARG = "gate_padding_mask"
# Keyword a caller may pass to a no-cache forward so that tokens from this position on count as "generated"
# (kept unscored) when ``decode_gating`` is off, matching what the cache does after the prompt call.
PROMPT_LENGTH_KWARG = "gate_prompt_length"
# Keyword the hook sets when the gates train in this forward (the gated layers then ignore an empty cache), so that
# the ungated layers make the same choice.
GATES_TRAINING_KWARG = "gate_training"


def rule_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                   valid: Optional[torch.Tensor], window: int, scale: float, softcap: float = 0.0) -> torch.Tensor:
    """Attention of ``query`` ``(B, Hq, T, D)`` over ``key``/``value`` ``(B, H, T, D)`` under the eviction rule
    (flags ``keep`` ``(B, H, T)``, padding ``valid`` ``(B, T)``, window, soft-cap), through
    ``paged_prefill_attention`` with an empty cache: no ``T x T`` mask is built."""
    B, H, _, D = key.shape
    pages = key.new_zeros(0, 1, D)
    table = torch.zeros(B, H, 0, dtype=torch.int32, device=key.device)
    lengths = torch.zeros(B, H, dtype=torch.int32, device=key.device)
    return paged_prefill_attention(query, pages, pages, table, lengths, key, value, keep, valid, window, scale,
                                   softcap=softcap)


class WrappedAttention(nn.Module):
    """The parts of a wrapper that only depend on the wrapped block (restored by ``remove_attention_gates``)."""

    def __init__(self, attention: nn.Module, family: AttentionFamily) -> None:
        super().__init__()
        self.attention = attention
        self.family = family
        self.layer_idx: int = attention.layer_idx
        self.head_dim: int = attention.head_dim
        self.scaling: float = attention.scaling
        self.softcap: float = family.softcap(attention)  # 0: scores are not soft-capped

    def project(self, hidden_states: torch.Tensor,
                position_embeddings: Tuple[torch.Tensor, torch.Tensor]) -> QKV:
        """The model's query ``(B, Hq, T, D)``, key and value ``(B, H, T, D)`` of ``hidden_states`` ``(B, T, d)``,
        RoPE applied to query and key, exactly as the wrapped attention computes them."""
        if position_embeddings is None:
            raise TypeError(f"layer {self.layer_idx} ({type(self.attention).__name__}) got no position_embeddings: "
                            "attention gates support RoPE models only")
        cos, sin = position_embeddings
        return self.family.project(self.attention, hidden_states, cos, sin, self.head_dim)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The block's output ``(B, T, d)`` of the attention output ``(B, Hq, T, D)``."""
        B, _, T, _ = out.shape
        return self.attention.o_proj(out.transpose(1, 2).reshape(B, T, -1).contiguous())

    @staticmethod
    def gated_cache(cache: Optional[Any], past_key_values: Optional[Any]) -> Optional[AttnGateCache]:
        """The cache of a call (``cache`` on transformers >= 5.24, ``past_key_values`` before); ``TypeError`` unless
        it is an :class:`AttnGateCache`."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, AttnGateCache):
            raise TypeError(f"a gated model needs an AttnGateCache, got {type(cache).__name__}")
        return cache
