"""Saving the gates of a gated model to a directory, and loading them back (checked against the model's shape)."""

from __future__ import annotations

import json
import os
from typing import Dict

import torch
import torch.nn as nn

from ..gate.config import AttentionGateConfig
from .decoder import model_facts
from .model import add_attention_gates, gate_config, gate_state_dict, gated_layers, is_gated

GATES_FILE = "attention_gates.safetensors"
CONFIG_FILE = "attention_gates.json"


def save_gates(model: nn.Module, path: str) -> None:
    """Writes the gates to directory ``path``: weights as safetensors and the config (plus model facts) as JSON."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in gate_state_dict(model).items()}
    save_file(tensors, os.path.join(path, GATES_FILE))
    meta = {"gate_config": gate_config(model).to_dict(), "model": model_facts(model)}
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
    facts = model_facts(model)
    for key, saved in meta["model"].items():
        if facts.get(key) != saved:
            raise ValueError(f"the gates at {path!r} were saved for a model with {key}={saved}, this one has "
                             f"{key}={facts.get(key)}")
    if is_gated(model):
        if gate_config(model) != config:
            raise ValueError(f"the model's gates have config {gate_config(model)}, the saved ones {config}; "
                             "call remove_attention_gates(model) first")
    else:
        add_attention_gates(model, config)
    tensors = load_file(weights_path)
    _check_finite(tensors, weights_path)
    layers = gated_layers(model)
    saved = sorted({int(name.split(".")[1]) for name in tensors})
    here = [attn.layer_idx for attn in layers]
    if saved != here:
        raise ValueError(f"the gates at {path!r} are for layers {saved}, this model gates layers {here}")
    for attn in layers:
        prefix = f"layers.{attn.layer_idx}."
        own = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        attn.gate.load_state_dict(own, strict=True)
    return model


def _check_finite(tensors: Dict[str, torch.Tensor], where: str) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{where}: gate weight {name} has {bad} NaN or infinite values; these gates are unusable "
                             "(retrain them with finite hyperparameters)")
