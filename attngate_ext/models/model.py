"""Turning a loaded Hugging Face Llama-style model into a gated one and back, and reading its gates."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..cache.cache import AttnGateCache
from ..gate.config import AttentionGateConfig, default_gate_head_dim
from ..gate.gate import AttentionGate
from .decoder import base_decoder, cache_kwarg, check_llama_attention, model_facts, rope_theta, sliding_window
from .gated_attention import PADDING_MASK_KWARG, GatedAttention


@dataclasses.dataclass
class _GatingState:
    """What add_attention_gates leaves on the model so that it can be undone."""

    config: AttentionGateConfig
    hook: Any
    cache_kwarg: str
    # Keyword arguments of the AttnGateCache the hook creates (set_cache_options).
    cache_options: Dict[str, Any] = dataclasses.field(default_factory=dict)


def _padding_hook(state_holder: nn.Module):
    """Pre-forward hook of the decoder: passes the 2-D padding mask down and installs an AttnGateCache."""

    def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
        state: _GatingState = state_holder._attngate_state
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            raise TypeError("pass attention_mask to a gated model by keyword")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(
                    f"a gated model takes a 2-D (batch, sequence) padding attention_mask, got {mask.dim()}-D; "
                    "the gates build the attention mask themselves"
                )
            kwargs[PADDING_MASK_KWARG] = mask
            kwargs["attention_mask"] = None  # the gated layers apply padding; no 4-D mask needs to be built
        key = state.cache_kwarg
        cache = kwargs.get(key, kwargs.get("past_key_values"))
        use_cache = kwargs.get("use_cache")
        if use_cache is None:  # what the model's forward would fall back to
            use_cache = getattr(module.config, "use_cache", False)
        if cache is None:
            if use_cache:
                kwargs[key] = AttnGateCache(**state.cache_options)
        elif not isinstance(cache, AttnGateCache):
            if cache.get_seq_length() > 0:
                raise ValueError(
                    f"a gated model cannot continue from a {type(cache).__name__} that already holds tokens; "
                    "use an AttnGateCache (generate() creates one)"
                )
            kwargs.pop("past_key_values", None)
            kwargs[key] = AttnGateCache(**state.cache_options)  # generate() made an empty DynamicCache: swap it
        return args, kwargs

    return hook


def add_attention_gates(model: nn.Module, config: Optional[AttentionGateConfig] = None) -> nn.Module:
    """Puts an Attention-Gate in front of every attention block of a Llama-style model, in place.

    Works for ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` and anything whose attention
    block has Llama's shape; anything else raises ``TypeError``. The gates are created on the model's device and
    dtype, initialised to keep every token (the gated model computes what the base model computes), and are the
    only new parameters. ``generate()`` then uses an :class:`AttnGateCache` automatically.

    Args:
        model: the model; modified in place and returned.
        config: gate settings; ``head_dim=None`` takes :func:`~attngate_ext.gate.config.default_gate_head_dim`
            (the gate's K'/V' cache at most ~3% of the dense cache, never below 8 dims).
    """
    config = dataclasses.replace(config) if config is not None else AttentionGateConfig()
    decoder = base_decoder(model)
    if is_gated(model):
        raise ValueError("the model already has attention gates; call remove_attention_gates(model) first")
    for idx, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        if isinstance(attn, GatedAttention):
            raise ValueError("the model already has attention gates; call remove_attention_gates(model) first")
        check_llama_attention(idx, attn)
    first = decoder.layers[0].self_attn
    facts = model_facts(model)
    if config.head_dim is None:
        width = default_gate_head_dim(facts["num_key_value_heads"], int(first.head_dim), config.num_kv_heads)
        config = dataclasses.replace(config, head_dim=width)
    theta = rope_theta(model.config)
    rope_memo: Dict[str, Any] = {}
    for layer in decoder.layers:
        attn = layer.self_attn
        weight = attn.q_proj.weight
        gate = AttentionGate(facts["hidden_size"], facts["num_key_value_heads"], config)
        gate.to(device=weight.device, dtype=weight.dtype)
        gated = GatedAttention(attn, gate, theta, sliding_window(attn))
        gated.rope_memo = rope_memo  # one gate RoPE table per forward for all layers
        gated.train(attn.training)
        layer.self_attn = gated
    hook = decoder.register_forward_pre_hook(_padding_hook(model), with_kwargs=True)
    model._attngate_state = _GatingState(config, hook, cache_kwarg(model))
    return model


def set_cache_options(model: nn.Module, **options: Any) -> Dict[str, Any]:
    """Sets the :class:`AttnGateCache` arguments of the caches a gated model creates itself (``generate()``, or a
    forward with ``use_cache=True`` and no cache), e.g. ``set_cache_options(model, max_tokens_per_head=512)``: a
    hard budget for every ``generate()`` call. Returns the options now in force; no arguments: none (defaults)."""
    state = _state(model)
    AttnGateCache(**options)  # the cache's own checks name a bad option
    state.cache_options = dict(options)
    return dict(state.cache_options)


def remove_attention_gates(model: nn.Module) -> nn.Module:
    """Restores the original attention modules (the gates are dropped) and removes the hook; returns the model."""
    state = _state(model)
    for layer in base_decoder(model).layers:
        if isinstance(layer.self_attn, GatedAttention):
            layer.self_attn = layer.self_attn.attention
    state.hook.remove()
    del model._attngate_state
    return model


def _state(model: nn.Module) -> _GatingState:
    state = getattr(model, "_attngate_state", None)
    if state is None:
        raise ValueError("the model has no attention gates; call add_attention_gates(model) first")
    return state


def is_gated(model: nn.Module) -> bool:
    """Whether :func:`add_attention_gates` put gates into ``model`` (and they were not removed)."""
    return hasattr(model, "_attngate_state")


def gate_config(model: nn.Module) -> AttentionGateConfig:
    """The AttentionGateConfig of a gated model."""
    return _state(model).config


# Fields that change the eviction rule but not the gates' weights: they may change after the gates are trained.
_RULE_FIELDS = ("threshold", "sink_tokens", "protect_recent", "decode_gating", "prefill_chunk")


def update_gate_config(model: nn.Module, **changes: Any) -> AttentionGateConfig:
    """Changes rule fields of a gated model's config in place (every layer) and returns the new config.

    Only ``threshold``, ``sink_tokens``, ``protect_recent``, ``decode_gating`` and ``prefill_chunk`` may change: they
    set how flags are applied, not the gates' shapes. E.g. ``update_gate_config(model, protect_recent=128)``.
    """
    bad = sorted(set(changes) - set(_RULE_FIELDS))
    if bad:
        raise ValueError(f"update_gate_config changes only {list(_RULE_FIELDS)}, not {bad}")
    state = _state(model)
    config = dataclasses.replace(state.config, **changes)
    state.config = config
    for gate in gates(model):
        gate.config = config
    return config


def gated_layers(model: nn.Module) -> List[GatedAttention]:
    """The gated attention modules of a gated model, one per decoder layer, in order."""
    _state(model)
    return [layer.self_attn for layer in base_decoder(model).layers]


def gates(model: nn.Module) -> List[AttentionGate]:
    """The gates of a gated model, one per decoder layer, in order."""
    return [attn.gate for attn in gated_layers(model)]


def gate_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The gate parameters only, keyed ``layers.{i}.{name}``."""
    return {
        f"layers.{i}.{name}": tensor for i, gate in enumerate(gates(model)) for name, tensor in gate.state_dict().items()
    }
