"""AttnGateCache: a ``transformers`` Cache whose layers keep, per (batch, KV head), only the K/V the gates keep.

The cache is filled by the gated attention modules that :func:`attngate_ext.add_attention_gates` installs (they
call :meth:`~.layer.AttnGateLayer.attend`); the generic ``Cache.update`` path of ungated attention is refused.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers.cache_utils import Cache

from .layer import AttnGateLayer
from .memory import MemoryReport, measure_layer


class AttnGateCache(Cache):
    """A ``transformers`` Cache for gated models: per layer and per (batch, KV head) only the kept K/V.

    ``model.generate`` on a gated model creates one automatically; build one yourself to inspect it afterwards::

        cache = AttnGateCache()
        model.generate(input_ids, max_new_tokens=32, **{attngate_ext.cache_kwarg(model): cache})
        print(cache.memory_report())

    Layers are created lazily. ``get_seq_length()`` counts sequence slots seen (padding included, as in
    ``DynamicCache``), so positions stay right even though evicted rows are gone.

    A hard budget, ``AttnGateCache(max_tokens_per_head=N)``: after every prompt chunk and decode step, every
    (layer, batch row, KV head) holds at most N tokens of the model's K/V (its ``protect_recent`` window included);
    a head that would hold more loses its lowest-scoring rows (the gate's retention probability; sinks last). Within
    one prompt chunk the chunk's own rows are held until the chunk ends: chunk long prompts (``generate(...,
    prefill_chunk_size=...)``) to bound the peak too. The gates' own K'/V' are not part of the budget.
    """

    def __init__(self, page_size: int = 16, max_tokens_per_head: Optional[int] = None) -> None:
        """``page_size``: rows per page of every (row, KV head) (the unit in which memory is taken and given back);
        ``max_tokens_per_head``: the hard budget N (None: none)."""
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"AttnGateCache page_size must be an integer >= 1, got {page_size!r}")
        if max_tokens_per_head is not None and (isinstance(max_tokens_per_head, bool)
                                                or not isinstance(max_tokens_per_head, int) or max_tokens_per_head < 1):
            raise ValueError(f"AttnGateCache max_tokens_per_head must be an integer >= 1 or None, got "
                             f"{max_tokens_per_head!r}")
        super().__init__(layers=[])
        self.page_size = page_size
        self.max_tokens_per_head = max_tokens_per_head

    def layer(self, layer_idx: int) -> AttnGateLayer:
        """The cache of decoder layer ``layer_idx`` (created on first use)."""
        while len(self.layers) <= layer_idx:
            self.layers.append(AttnGateLayer(self.page_size, self.max_tokens_per_head))
        return self.layers[layer_idx]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Refused: only gated attention layers fill this cache (see :meth:`layer`)."""
        return AttnGateLayer.update(None, key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def memory_report(self) -> MemoryReport:
        """What the cache holds against what a dense cache of the same tokens would hold (see :class:`MemoryReport`;
        ``.as_dict()`` for a dict). This reads lengths and free counts back from the device (a few
        synchronisations)."""
        return MemoryReport.of_layers(measure_layer(layer) for layer in self.layers if layer.is_initialized)
