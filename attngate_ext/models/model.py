"""Turning a loaded Hugging Face Llama-style model into a gated one, and back; saving and loading the gates."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..cache.cache import AttnGateCache
from ..gate.config import AttentionGateConfig, default_gate_head_dim
from ..gate.gate import AttentionGate
from .gated_attention import PADDING_MASK_KWARG, GatedAttention

GATES_FILE = "attention_gates.safetensors"
CONFIG_FILE = "attention_gates.json"
_REQUIRED = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")
# Attention features that change the math beyond Llama's shape; a module with any of them is refused.
_UNSUPPORTED = ("q_norm", "k_norm", "sinks", "attn_logit_softcapping", "qkv_proj", "c_attn")


@dataclasses.dataclass
class _GatingState:
    """What add_attention_gates leaves on the model so that it can be undone."""

    config: AttentionGateConfig
    hook: Any
    cache_kwarg: str


def _decoder(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", model)
    if not isinstance(getattr(base, "layers", None), nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} is not a Llama-style decoder (expected model.model.layers or model.layers); "
            "attention gates support LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and models of that shape"
        )
    return base


def _check_attention(layer_idx: int, attn: Any) -> None:
    name = type(attn).__name__
    if isinstance(attn, GatedAttention):
        raise ValueError("the model already has attention gates; call remove_attention_gates(model) first")
    missing = [attr for attr in _REQUIRED if not hasattr(attn, attr)]
    extra = [attr for attr in _UNSUPPORTED if getattr(attn, attr, None) is not None]
    if missing or extra:
        why = f"missing {missing}" if missing else f"has unsupported {extra}"
        raise TypeError(
            f"layer {layer_idx}: {name} is not a Llama-shaped attention block ({why}); attention gates support "
            "Llama, Mistral and Qwen2 attention (q/k/v/o projections, RoPE, GQA, optional bias)"
        )


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", None) or 10000.0)


def _model_facts(model: nn.Module) -> Dict[str, int]:
    config = model.config
    return {
        "num_hidden_layers": len(_decoder(model).layers),
        "hidden_size": int(config.hidden_size),
        "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
    }


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
                kwargs[key] = AttnGateCache()
        elif not isinstance(cache, AttnGateCache):
            if cache.get_seq_length() > 0:
                raise ValueError(
                    f"a gated model cannot continue from a {type(cache).__name__} that already holds tokens; "
                    "use an AttnGateCache (generate() creates one)"
                )
            kwargs.pop("past_key_values", None)
            kwargs[key] = AttnGateCache()  # generate() made an empty DynamicCache: swap in the gated one
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
    decoder = _decoder(model)
    if hasattr(model, "_attngate_state"):
        raise ValueError("the model already has attention gates; call remove_attention_gates(model) first")
    for idx, layer in enumerate(decoder.layers):
        _check_attention(idx, getattr(layer, "self_attn", None))
    first = decoder.layers[0].self_attn
    facts = _model_facts(model)
    if config.head_dim is None:
        width = default_gate_head_dim(facts["num_key_value_heads"], int(first.head_dim), config.num_kv_heads)
        config = dataclasses.replace(config, head_dim=width)
    theta = _rope_theta(model.config)
    rope_memo: Dict[str, Any] = {}
    for layer in decoder.layers:
        attn = layer.self_attn
        weight = attn.q_proj.weight
        gate = AttentionGate(facts["hidden_size"], facts["num_key_value_heads"], config)
        gate.to(device=weight.device, dtype=weight.dtype)
        gated = GatedAttention(attn, gate, theta, _sliding_window(attn))
        gated.rope_memo = rope_memo  # one gate RoPE table per forward for all layers
        gated.train(attn.training)
        layer.self_attn = gated
    params = inspect.signature(decoder.forward).parameters
    cache_kwarg = "cache" if "cache" in params else "past_key_values"
    hook = decoder.register_forward_pre_hook(_padding_hook(model), with_kwargs=True)
    model._attngate_state = _GatingState(config, hook, cache_kwarg)
    return model


def _sliding_window(attn: nn.Module) -> Optional[int]:
    if hasattr(attn, "sliding_window"):  # Qwen2: per layer, None on full-attention layers
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)  # Mistral: one window for every layer


def remove_attention_gates(model: nn.Module) -> nn.Module:
    """Restores the original attention modules (the gates are dropped) and removes the hook; returns the model."""
    state = _state(model)
    for layer in _decoder(model).layers:
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
    return config


def gates(model: nn.Module) -> List[AttentionGate]:
    """The gates of a gated model, one per decoder layer, in order."""
    _state(model)
    return [layer.self_attn.gate for layer in _decoder(model).layers]


def gate_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The gate parameters only, keyed ``layers.{i}.{name}``."""
    return {
        f"layers.{i}.{name}": tensor for i, gate in enumerate(gates(model)) for name, tensor in gate.state_dict().items()
    }


def save_gates(model: nn.Module, path: str) -> None:
    """Writes the gates to directory ``path``: weights as safetensors and the config (plus model facts) as JSON."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in gate_state_dict(model).items()}
    save_file(tensors, os.path.join(path, GATES_FILE))
    meta = {"gate_config": gate_config(model).to_dict(), "model": _model_facts(model)}
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def load_gates(model: nn.Module, path: str) -> nn.Module:
    """Loads gates saved by :func:`save_gates` into ``model`` (adding gates first if it has none); returns it.

    Raises ``ValueError`` naming the mismatch when the gates were saved for a different model shape or the model
    already has gates with another config, or naming the tensor when a weight is NaN or infinite (such gates would
    evict every token), and ``FileNotFoundError`` when ``path`` holds no saved gates.
    """
    from safetensors.torch import load_file

    config_path = os.path.join(path, CONFIG_FILE)
    weights_path = os.path.join(path, GATES_FILE)
    for needed in (config_path, weights_path):
        if not os.path.isfile(needed):
            raise FileNotFoundError(f"no saved attention gates at {path!r} (missing {os.path.basename(needed)})")
    with open(config_path) as f:
        meta = json.load(f)
    config = AttentionGateConfig.from_dict(meta["gate_config"])
    facts = _model_facts(model)
    for key, saved in meta["model"].items():
        if facts.get(key) != saved:
            raise ValueError(f"the gates at {path!r} were saved for a model with {key}={saved}, this one has "
                             f"{key}={facts.get(key)}")
    if hasattr(model, "_attngate_state"):
        if gate_config(model) != config:
            raise ValueError(f"the model's gates have config {gate_config(model)}, the saved ones {config}; "
                             "call remove_attention_gates(model) first")
    else:
        add_attention_gates(model, config)
    tensors = load_file(weights_path)
    _check_finite(tensors, weights_path)
    for i, gate in enumerate(gates(model)):
        prefix = f"layers.{i}."
        own = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        gate.load_state_dict(own, strict=True)
    return model


def _check_finite(tensors: Dict[str, torch.Tensor], where: str) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{where}: gate weight {name} has {bad} NaN or infinite values; these gates are unusable "
                             "(retrain them with finite hyperparameters)")
