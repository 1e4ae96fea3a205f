"""WindowAttention: the ``self_attn`` of an ungated sliding-window layer (Gemma 2 and 3 local layers, Qwen2/Qwen3
sliding layers), plain sliding-window attention through the same cache and kernels as the gated layers."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn as nn

from ..gate.masks import block_visibility, grouped_attention
from ..gate.ste_attention import ste_gated_attention
from .families import AttentionFamily
from .wrapped_attention import GATES_TRAINING_KWARG, PADDING_MASK_KWARG, WrappedAttention, rule_attention


class WindowAttention(WrappedAttention):
    """A sliding-window layer of a model that mixes them with full-attention layers: it carries no gate.

    Query i sees key j when ``0 <= i - j < window`` (the last ``window`` sequence slots, itself included), which is
    ``transformers``' sliding-window mask, and never padding. That is the eviction rule (docs/design.md, section 2)
    with every flag off and ``protect_recent = window``, so the same ops run it: without a cache
    ``paged_prefill_attention`` over an empty cache, with an :class:`~attngate_ext.AttnGateCache` the layer's ring
    of the last ``window`` rows (nothing ever reaches its pages; :meth:`~attngate_ext.cache.layer.AttnGateLayer.
    attend_window`), which the memory report counts like any other layer's K/V.
    """

    def __init__(self, attention: nn.Module, family: AttentionFamily, window: int, prefill_chunk: int = 0) -> None:
        super().__init__(attention, family)
        self.window = window
        self.prefill_chunk = prefill_chunk  # the gates' prompt chunk, so a long prompt runs in the same slices

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[Any] = None,
        past_key_values: Optional[Any] = None,
        **kwargs: Any,
    ) -> Tuple[torch.Tensor, None]:
        """Same signature and result as the wrapped attention (``(output, None)``); ``attention_mask`` is ignored
        (padding comes from the hook's 2-D mask, as in :class:`~.gated_attention.GatedAttention`)."""
        cache = self.gated_cache(cache, past_key_values)
        B, T, _ = hidden_states.shape
        padding_mask = kwargs.get(PADDING_MASK_KWARG)
        valid = None if padding_mask is None else padding_mask[:, -T:].to(torch.bool)
        query, key, value = self.project(hidden_states, position_embeddings)
        if cache is not None and kwargs.get(GATES_TRAINING_KWARG, False):
            # The gated layers train through the straight-through path and ignore the (empty) cache: do the same.
            cache = None
        if cache is not None:
            out = cache.layer(self.layer_idx).attend_window(query, key, value, valid, self.window, self.scaling,
                                                            self.softcap, self.prefill_chunk)
            return self.output(out), None
        keep = torch.zeros(B, key.shape[1], T, dtype=torch.bool, device=key.device)
        dropout = self.attention.attention_dropout if self.training else 0.0
        if dropout > 0.0:
            out = grouped_attention(query, key, value, block_visibility(keep, valid, self.window), self.scaling,
                                    dropout, self.softcap)
        elif torch.is_grad_enabled() and (query.requires_grad or value.requires_grad):
            # The ops have no autograd: the training attention (keep weights 0 outside the window) is blockwise
            # and differentiable, so gradients reach the gates of the layers before this one.
            retain = torch.zeros(keep.shape, dtype=query.dtype, device=query.device)
            out = ste_gated_attention(query, key, value, retain, valid, self.window, self.scaling,
                                      softcap=self.softcap)
        else:
            out = rule_attention(query, key, value, keep, valid, self.window, self.scaling, self.softcap)
        return self.output(out), None
