"""Recording what each gated layer of a model was called with, to recompute its queries and keys afterwards.

Training targets (the future attention a token receives) and post-prefill baselines (which score a prompt from its
attention) need each layer's post-RoPE queries and keys; they record the layers' inputs during one forward and
call :meth:`~.gated_attention.GatedAttention.project` on them, so the gated layers themselves keep no such state.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from .model import gated_layers


@dataclasses.dataclass
class LayerInputs:
    """The inputs of a gated layer's last forward."""

    hidden: torch.Tensor  # (B, T, d) the layer input (post-norm hidden states)
    position_embeddings: Tuple[torch.Tensor, torch.Tensor]  # the model's RoPE tables of these positions
    position_ids: Optional[torch.Tensor]  # (1 or B, T) when the model passed them
    valid: Optional[torch.Tensor]  # (B, T) bool, False on padding; None: no padding


@contextlib.contextmanager
def recording_layer_inputs(model: nn.Module) -> Iterator[List[Optional[LayerInputs]]]:
    """Within the block, each forward of a gated layer records its :class:`LayerInputs` into the yielded list (one
    entry per layer, the last forward's; None until the layer runs)."""
    layers = gated_layers(model)
    recorded: List[Optional[LayerInputs]] = [None] * len(layers)

    def recorder(index: int):
        def record(module, args, kwargs, output) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            recorded[index] = LayerInputs(hidden, kwargs.get("position_embeddings"), kwargs.get("position_ids"),
                                          module.last_valid)
        return record

    handles = [attn.register_forward_hook(recorder(i), with_kwargs=True) for i, attn in enumerate(layers)]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
