"""Atomic training checkpoints: ``OUT/checkpoints/step-N`` with the gates, the LoRA adapter and the optimizer state."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch

from ..models.gate_files import save_gates


def trainable_parameters(model) -> Dict[str, torch.nn.Parameter]:
    """The parameters that need gradients, by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _steps(out: Path):
    return sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``out`` (None if there is none)."""
    found = _steps(out)
    return found[-1] if found else None


def save_checkpoint(out: Path, step: int, model, peft_model, optimizer, scheduler, keep: int) -> Path:
    """Writes ``out/checkpoints/step-{step}`` (via a temporary directory, so it exists only once complete) and
    deletes all but the ``keep`` newest checkpoints."""
    path = out / "checkpoints" / f"step-{step}"
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_gates(model, str(tmp / "gates"))
    if peft_model is not None:
        peft_model.save_pretrained(str(tmp / "lora"))
    state = {
        "step": step,
        "trainable": {k: v.detach().cpu() for k, v in trainable_parameters(model).items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    for old in _steps(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    """Restores the trainable tensors, optimizer, scheduler and RNG state; returns the step to continue from."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    params = trainable_parameters(model)
    missing = sorted(set(params) ^ set(state["trainable"]))
    if missing:
        raise ValueError(f"checkpoint {path} does not match this run's trainable parameters: {missing[:5]}")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])
