"""Post-prefill pruning (as kvpress does): prefill with every token cached, score the prompt with a baseline policy,
then drop the rest of each head's rows in place.

    with recording_layer_inputs(model) as inputs:       # attngate_ext.models.layer_inputs
        model(ids, use_cache=True, **{cache_kwarg(model): cache})
    prune_cache(model, cache, H2O(), 0.5, inputs)
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from ..cache.cache import AttnGateCache
from ..models.layer_inputs import LayerInputs
from ..models.model import gated_layers
from .policies import Policy, budget_flags, keep_budget


@torch.no_grad()
def prune_cache(model: nn.Module, cache: AttnGateCache, policy: Policy, eviction_ratio: float,
                inputs: Sequence[Optional[LayerInputs]]) -> List[torch.Tensor]:
    """Scores the prompt the model just prefilled into ``cache`` (every token cached: keep-all gates, w = 1) from
    the layer ``inputs`` recorded during that prefill, and compacts each layer in place to the policy's budget.

    Returns the keep flags ``(B, H, T)`` of every layer (indexed by sequence slot).
    """
    flags = []
    for attn, recorded in zip(gated_layers(model), inputs):
        layer = cache.layers[attn.layer_idx]  # ungated sliding-window layers hold their window only: not pruned
        if recorded is None:
            raise RuntimeError("prune_cache needs the prefill's layer inputs: run the prefill inside "
                               "recording_layer_inputs(model)")
        query, key, _ = attn.project(recorded.hidden, recorded.position_embeddings)
        B, H, T, _ = key.shape
        valid = recorded.valid if recorded.valid is not None else torch.ones(B, T, dtype=torch.bool,
                                                                             device=key.device)
        if not torch.equal(layer.kv.lengths.long().sum(dim=1), valid.sum(dim=1) * H):
            raise RuntimeError("prune_cache needs a cache that holds every prompt token (keep-all gates, w = 1)")
        budget = keep_budget(valid, eviction_ratio)
        keep = budget_flags(policy.scores(query, key, valid, budget), valid, budget)
        # Cache rows are the valid slots in order: move each row's flag to its row index.
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        keep_rows = keep.gather(2, order.unsqueeze(1).expand(B, H, T))
        layer.kv.compact(keep_rows)
        layer.kv.shrink()
        flags.append(keep)
    return flags
