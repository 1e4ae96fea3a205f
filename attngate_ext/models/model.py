"""Turning a loaded Hugging Face model of a supported family into a gated one and back, and reading its gates."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..cache.cache import AttnGateCache
from ..gate.config import AttentionGateConfig, default_gate_head_dim
from ..gate.gate import AttentionGate
from .decoder import base_decoder, cache_kwarg, model_facts, rope_theta, sliding_window, window_only_layers
from .families import attention_family
from .gated_attention import GatedAttention
from .window_attention import WindowAttention
from .wrapped_attention import GATES_TRAINING_KWARG, PADDING_MASK_KWARG, WrappedAttention


@dataclasses.dataclass
class _GatingState:
    """What add_attention_gates leaves on the model so that it can be undone."""

    config: AttentionGateConfig
    hook: Any
    cache_kwarg: str
    # Keyword arguments of the AttnGateCache the hook creates (set_cache_options).
    cache_options: Dict[str, Any] = dataclasses.field(default_factory=dict)


def _padding_hook(state_holder: nn.Module):
    """Pre-forward hook of the decoder: passes the 2-D padding mask down, says whether the gates train in this
    forward, and installs an AttnGateCache."""

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
        kwargs[GATES_TRAINING_KWARG] = any(attn._training_gates() for attn in gated_layers(state_holder))
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
    """Puts an Attention-Gate in front of every full-attention block of a model, in place.

    Works for the causal LMs of Llama, Mistral, Qwen2, Qwen3, OLMo-2, Phi-3, Gemma 2 and Gemma 3 (``Gemma3ForCausalLM``)
    and anything whose attention block has Llama's shape (:mod:`.families`); anything else raises ``TypeError``
    naming the model class and the missing piece. In a model that mixes sliding-window and full-attention layers
    (Gemma 2 and 3, Qwen2/Qwen3 with ``use_sliding_window``) the sliding-window layers get no gate: they do plain
    sliding-window attention (:class:`~.window_attention.WindowAttention`) and the cache holds their last ``window``
    rows. The gates are created on the model's device and dtype, initialised to keep every token (the gated model
    computes what the base model computes), and are the only new parameters. ``generate()`` then uses an
    :class:`AttnGateCache` automatically.

    Args:
        model: the model; modified in place and returned.
        config: gate settings; ``head_dim=None`` takes :func:`~attngate_ext.gate.config.default_gate_head_dim`
            (the gate's K'/V' cache at most ~3% of the dense cache, never below 8 dims).
    """
    config = dataclasses.replace(config) if config is not None else AttentionGateConfig()
    decoder = base_decoder(model)
    if is_gated(model):
        raise ValueError("the model already has attention gates; call remove_attention_gates(model) first")
    name = type(model).__name__
    families = []
    for idx, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        if isinstance(attn, WrappedAttention):
            raise ValueError("the model already has attention gates; call remove_attention_gates(model) first")
        families.append(attention_family(name, idx, attn))
    windows = window_only_layers(model)
    first = decoder.layers[0].self_attn
    facts = model_facts(model)
    if config.head_dim is None:
        width = default_gate_head_dim(facts["num_key_value_heads"], int(first.head_dim), config.num_kv_heads)
        config = dataclasses.replace(config, head_dim=width)
    theta = rope_theta(model.config)
    rope_memo: Dict[str, Any] = {}
    for idx, (layer, family) in enumerate(zip(decoder.layers, families)):
        attn = layer.self_attn
        if idx in windows:
            wrapped: WrappedAttention = WindowAttention(attn, family, windows[idx], config.prefill_chunk)
        else:
            weight = next(attn.parameters())
            gate = AttentionGate(facts["hidden_size"], facts["num_key_value_heads"], config)
            gate.to(device=weight.device, dtype=weight.dtype)
            wrapped = GatedAttention(attn, gate, theta, sliding_window(attn), family)
            wrapped.rope_memo = rope_memo  # one gate RoPE table per forward for all layers
        wrapped.train(attn.training)
        layer.self_attn = wrapped
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
        if isinstance(layer.self_attn, WrappedAttention):
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
_RULE_FIELDS = ("threshold", "sink_tokens", "protect_recent", "decode_gating", "prefill_chunk", "attention_window")


def update_gate_config(model: nn.Module, **changes: Any) -> AttentionGateConfig:
    """Changes rule fields of a gated model's config in place (every layer) and returns the new config.

    Only ``threshold``, ``sink_tokens``, ``protect_recent``, ``decode_gating``, ``prefill_chunk`` and
    ``attention_window`` may change: they set how flags are made and applied, not the gates' shapes. E.g.
    ``update_gate_config(model, protect_recent=128)``.
    """
    bad = sorted(set(changes) - set(_RULE_FIELDS))
    if bad:
        raise ValueError(f"update_gate_config changes only {list(_RULE_FIELDS)}, not {bad}")
    state = _state(model)
    config = dataclasses.replace(state.config, **changes)
    state.config = config
    for gate in gates(model):
        gate.config = config
    for layer in base_decoder(model).layers:
        if isinstance(layer.self_attn, WindowAttention):
            layer.self_attn.prefill_chunk = config.prefill_chunk
    return config


def gated_layers(model: nn.Module) -> List[GatedAttention]:
    """The gated attention modules of a gated model, in layer order: one per decoder layer, except the ungated
    sliding-window layers of a model that mixes them with full attention (their index: ``attn.layer_idx``)."""
    _state(model)
    return [layer.self_attn for layer in base_decoder(model).layers if isinstance(layer.self_attn, GatedAttention)]


def gates(model: nn.Module) -> List[AttentionGate]:
    """The gates of a gated model, one per gated layer (see :func:`gated_layers`), in order."""
    return [attn.gate for attn in gated_layers(model)]


def gate_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The gate parameters only, keyed ``layers.{i}.{name}`` with ``i`` the decoder layer's index (ungated
    sliding-window layers have no entries)."""
    return {f"layers.{attn.layer_idx}.{name}": tensor for attn in gated_layers(model)
            for name, tensor in attn.gate.state_dict().items()}
