"""Gated tiny models that evict a chosen share of tokens, and their logits decoded through an AttnGateCache."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

import attngate_ext as ag
from attngate_ext import cache_kwarg
from attngate_ext.models.calibration import calibrate_gate_bias, randomize_gates
from attngate_ext.models.model import gated_layers

from .models import make_model, random_ids, save_tiny_model


def gated_model(kind: str = "mistral", eviction: float = 0.5, seed: int = 0,
                calibration_ids: Optional[torch.Tensor] = None, model_overrides: Optional[Dict[str, Any]] = None,
                **config) -> torch.nn.Module:
    """A tiny model of ``kind`` (``model_overrides``: model config fields) with random gates (``config``: gate
    config fields) calibrated to evict ``eviction`` of the tokens of ``calibration_ids`` (default: two random rows
    of 48)."""
    model = make_model(kind, **(model_overrides or {}))
    ag.add_attention_gates(model, ag.AttentionGateConfig(**config))
    randomize_gates(model, seed=seed)
    ids = calibration_ids if calibration_ids is not None else random_ids(2, 48, seed=7)
    calibrate_gate_bias(model, ids, eviction)
    return model


def save_tiny_gated_model(root, kind: str = "llama", seed: int = 5, **config):
    """Writes a tiny ``kind`` model to ``root/model`` and random gates for it (``config``: gate config fields) to
    ``root/gates``, as the command-line tools read them; returns both folders."""
    model_dir, gates_dir = root / "model", root / "gates"
    save_tiny_model(model_dir, kind)
    model = ag.add_attention_gates(make_model(kind), ag.AttentionGateConfig(**config))
    randomize_gates(model, seed=seed)
    ag.save_gates(model, str(gates_dir))
    return model_dir, gates_dir


def incremental_logits(model, ids: torch.Tensor, prompt_len: int, attention_mask: Optional[torch.Tensor] = None,
                       position_ids: Optional[torch.Tensor] = None,
                       step: int = 1) -> Tuple[torch.Tensor, ag.AttnGateCache]:
    """Prefill ``prompt_len`` tokens, then ``step`` tokens per call, through one AttnGateCache; logits per
    position."""
    cache = ag.AttnGateCache()
    key = cache_kwarg(model)

    def call(sl):
        kwargs = {key: cache, "use_cache": True}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, : sl.stop]
        if position_ids is not None:
            kwargs["position_ids"] = position_ids[:, sl]
        return model(ids[:, sl], **kwargs).logits

    logits: List[torch.Tensor] = [call(slice(0, prompt_len))]
    for t in range(prompt_len, ids.shape[1], step):
        logits.append(call(slice(t, min(t + step, ids.shape[1]))))
    return torch.cat(logits, dim=1), cache


def gated_retention(model, cache: ag.AttnGateCache) -> float:
    """The kept share of the gated layers' tokens (the ungated sliding-window layers left out)."""
    report = cache.memory_report()
    kept = [report.retention_per_layer[attn.layer_idx] for attn in gated_layers(model)]
    return sum(kept) / len(kept)
