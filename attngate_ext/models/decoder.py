"""Reading a Hugging Face Llama-style causal LM: its decoder, its cache keyword, its shape, and whether an attention
block has Llama's shape (the only shape the gates wrap)."""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch.nn as nn

_REQUIRED = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")
# Attention features that change the math beyond Llama's shape; a module with any of them is refused.
_UNSUPPORTED = ("q_norm", "k_norm", "sinks", "attn_logit_softcapping", "qkv_proj", "c_attn")


def base_decoder(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (``model.model``, or ``model`` itself), whose ``layers`` hold the attention
    blocks; calling it runs the layers without the LM head. ``TypeError`` for a model of another shape."""
    base = getattr(model, "model", model)
    if not isinstance(getattr(base, "layers", None), nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} is not a Llama-style decoder (expected model.model.layers or model.layers); "
            "attention gates support LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and models of that shape"
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
    """The RoPE base of a model config (``rope_parameters`` of recent transformers, else ``rope_theta``)."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", None) or 10000.0)


def sliding_window(attn: nn.Module) -> Optional[int]:
    """The sliding-window length of an attention block, or None for full attention."""
    if hasattr(attn, "sliding_window"):  # Qwen2: per layer, None on full-attention layers
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)  # Mistral: one window for every layer


def check_llama_attention(layer_idx: int, attn: Any) -> None:
    """``TypeError`` unless ``attn`` has Llama's shape: q/k/v/o projections, RoPE, GQA, optional bias."""
    name = type(attn).__name__
    missing = [attr for attr in _REQUIRED if not hasattr(attn, attr)]
    extra = [attr for attr in _UNSUPPORTED if getattr(attn, attr, None) is not None]
    if missing or extra:
        why = f"missing {missing}" if missing else f"has unsupported {extra}"
        raise TypeError(
            f"layer {layer_idx}: {name} is not a Llama-shaped attention block ({why}); attention gates support "
            "Llama, Mistral and Qwen2 attention (q/k/v/o projections, RoPE, GQA, optional bias)"
        )
