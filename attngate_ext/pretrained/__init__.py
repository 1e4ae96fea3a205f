"""Trained Attention-Gates shipped with the package, loadable by name.

    import attngate_ext as ag
    model = AutoModelForCausalLM.from_pretrained(".../SmolLM2-135M-Instruct")
    ag.load_pretrained_gates(model, "smollm2-135m-instruct", eviction=0.5)   # gates in, threshold for 50%
    ag.load_gates(model, ag.pretrained_gates("smollm2-135m-instruct"))      # or: the directory, as trained

Each entry is a directory next to this file holding ``attention_gates.safetensors`` and ``attention_gates.json``
(the :func:`attngate_ext.save_gates` format), ``thresholds.json`` (the bias shift that makes the gates evict a given
ratio, measured on training text) and ``README.md`` (the card: data, settings, steps, time, measured results).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
THRESHOLDS_FILE = "thresholds.json"


def list_pretrained_gates() -> List[str]:
    """The names of the shipped gates."""
    return sorted(p.name for p in HERE.iterdir() if (p / "attention_gates.json").is_file())


def pretrained_gates(name: str) -> str:
    """The directory of the shipped gates ``name`` (for :func:`attngate_ext.load_gates`); ``KeyError`` lists the
    available names when there is no such entry."""
    path = HERE / name
    if not (path / "attention_gates.json").is_file():
        raise KeyError(f"no pretrained gates named {name!r}; available: {list_pretrained_gates()}")
    return str(path)


def _thresholds(name: str) -> Dict[str, Any]:
    path = Path(pretrained_gates(name)) / THRESHOLDS_FILE
    return json.loads(path.read_text()) if path.is_file() else {"shifts": {}}


def load_pretrained_gates(model: nn.Module, name: str, eviction: Optional[float] = None) -> nn.Module:
    """Loads the shipped gates ``name`` into ``model`` (adding gates if it has none) and returns it.

    ``eviction``: shift every gate bias by the amount stored for that ratio (measured on training text; the
    measured ratio on other text differs somewhat, since the gates decide from content). ``None`` keeps the
    gates as trained. A ratio between two stored ones interpolates their shifts.
    """
    from ..models.gate_files import load_gates
    from ..models.model import gates

    load_gates(model, pretrained_gates(name))
    if eviction is None:
        return model
    shift = _shift_for(name, eviction)
    with torch.no_grad():
        for gate in gates(model):
            gate.score.bias.add_(shift)
    return model


def _shift_for(name: str, eviction: float) -> float:
    stored = sorted((float(k), float(v)) for k, v in _thresholds(name)["shifts"].items())
    if not stored:
        raise ValueError(f"the pretrained gates {name!r} store no thresholds; calibrate them with "
                         "attngate_ext.calibrate_gate_threshold")
    if not stored[0][0] <= eviction <= stored[-1][0]:
        raise ValueError(f"eviction {eviction} is outside the stored range [{stored[0][0]}, {stored[-1][0]}] of "
                         f"{name!r}; calibrate with attngate_ext.calibrate_gate_threshold")
    for (r0, s0), (r1, s1) in zip(stored, stored[1:] + stored[-1:]):
        if r0 <= eviction <= r1:
            return s0 if r1 == r0 else s0 + (s1 - s0) * (eviction - r0) / (r1 - r0)
    return stored[-1][1]


def matching_pretrained_gates(model: nn.Module) -> Optional[str]:
    """The name of shipped gates trained for a model of this shape and vocabulary, or None."""
    config = model.config
    facts = {
        "num_hidden_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
        "vocab_size": int(config.vocab_size),
    }
    for name in list_pretrained_gates():
        meta = json.loads((HERE / name / "attention_gates.json").read_text())
        wanted = {**meta["model"], "vocab_size": _thresholds(name).get("vocab_size")}
        if all(facts.get(k) == v for k, v in wanted.items()):
            return name
    return None
