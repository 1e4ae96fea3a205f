"""Reading a Hugging Face decoder-only causal LM: its decoder, its cache keyword, its shape, its RoPE base and which
layers use a sliding window (the attention blocks themselves: :mod:`.families`)."""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional

import torch.nn as nn

def base_decoder(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (``model.model``, or ``model`` itself), whose ``layers`` hold the attention
    blocks; calling it runs the layers without the LM head. ``TypeError`` for a model of another shape."""
    base = getattr(model, "model", model)
    if not isinstance(getattr(base, "layers", None), nn.ModuleList):
        gpt2_like = any(hasattr(module, "c_attn") for module in model.modules())
        why = ", and its attention is a fused `c_attn` without RoPE (GPT-2 style)" if gpt2_like else ""
        raise TypeError(
            f"{type(model).__name__} is not a Llama-style decoder: it has no decoder layer list (model.model.layers "
            f"or model.layers){why}; attention gates support the causal LMs of Llama, Mistral, Qwen2, Qwen3, OLMo-2, "
            "Phi-3, Gemma 2 and Gemma 3 and models of that shape"
        )
    return base


def cache_kwarg(model: nn.Module) -> str:
    """The forward (and ``generate``) keyword of a model's cache: ``cache`` on transformers >= 5.24,
    ``past_key_values`` before. E.g. ``model.generate(ids, **{cache_kwarg(model): cache})``."""
    return "cache" if "cache" in inspect.signature(base_decoder(model).forward).parameters else "past_key_values"


def model_facts(model: nn.Module) -> Dict[str, int]:
    """The shape that saved gates must match: layers, hidden size and KV heads."""
    config = model.config
    return {
        "num_hidden_layers": len(base_decoder(model).layers),
        "hidden_size": int(config.hidden_size),
        "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
    }


def rope_theta(config: Any) -> float:
    """The RoPE base of a model config (``rope_parameters`` of recent transformers, else ``rope_theta``); for a model
    with one RoPE per layer type (Gemma 3: a local base on sliding layers), that of the full-attention layers, the
    ones that carry gates."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", None) or 10000.0)


def sliding_window(attn: nn.Module) -> Optional[int]:
    """The sliding-window length of an attention block, or None for full attention."""
    if hasattr(attn, "sliding_window"):  # Qwen2: per layer, None on full-attention layers
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)  # Mistral: one window for every layer


def window_only_layers(model: nn.Module) -> Dict[int, int]:
    """``{layer index: window}`` of the layers left ungated: the sliding-window layers of a model that mixes them
    with full-attention layers (``config.layer_types``: Gemma 2 and 3, Qwen2/Qwen3 with ``use_sliding_window``).

    Such a layer attends to its last ``window`` sequence slots (itself included), as ``transformers``' sliding-window
    mask does; a model whose every layer has the same window (Mistral, Phi-3) keeps gates on every layer (see
    :func:`sliding_window`). ``TypeError`` for a layer type that is neither (chunked, linear attention...).
    """
    types: List[str] = list(getattr(model.config, "layer_types", None) or [])
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise TypeError(f"{type(model).__name__}: layer types {unknown} are not supported; attention gates wrap "
                        "full-attention layers and leave sliding-window ones ungated")
    if "full_attention" not in types or "sliding_attention" not in types:
        return {}
    layers = base_decoder(model).layers
    return {idx: int(sliding_window(layers[idx].self_attn)) for idx, kind in enumerate(types)
            if kind == "sliding_attention"}
