"""The eviction loss (docs/design.md, section 3) and the retention statistics logged during training."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn


def collect_retention(model: nn.Module) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """The retention weights ``F`` ``(B, H, T)`` of every gated layer from the model's last forward, and its padding
    mask ``(B, T)`` (None when there was none). ``F`` is differentiable when the gates were being trained."""
    from ..models.model import _decoder, _state

    _state(model)
    layers = _decoder(model).layers
    retain = [layer.self_attn.last_retain for layer in layers]
    if any(r is None for r in retain):
        raise RuntimeError("run a forward pass of the gated model before collecting its retention")
    return retain, layers[0].self_attn.last_valid


def retention_stats(retain: Sequence[torch.Tensor], valid: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """Measured retention (kept fraction of non-padding tokens): overall, per layer and per (layer, KV head)."""
    per_head = []
    with torch.no_grad():
        for layer_retain in retain:
            weight = _valid_weight(layer_retain, valid)
            kept = (layer_retain.float() * weight).sum(dim=(0, 2))
            count = weight.sum(dim=(0, 2)).clamp_min(1.0)
            per_head.append((kept / count).tolist())
    per_layer = [sum(h) / len(h) for h in per_head]
    return {
        "retention": sum(per_layer) / len(per_layer) if per_layer else 1.0,
        "retention_per_layer": per_layer,
        "retention_per_head": per_head,
    }


def _valid_weight(layer_retain: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    B, H, T = layer_retain.shape
    if valid is None:
        return torch.ones(B, H, T, device=layer_retain.device)
    return valid.view(B, 1, T).to(torch.float32).expand(B, H, T)


def eviction_loss(
    retain: Sequence[torch.Tensor],
    valid: Optional[torch.Tensor] = None,
    target_eviction: float = 0.5,
    alpha: float = 1.0,
    per_layer: bool = False,
    per_head: bool = False,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """``alpha * (mean retention - rho)^2`` with ``rho = 1 - target_eviction`` (docs/design.md, section 3).

    Args:
        retain: per layer, the retention weights ``F`` ``(B, H, T)`` (straight-through flags: the forward value is the
            hard flag, the gradient is the sigmoid's), e.g. from :func:`collect_retention`.
        valid: ``(B, T)`` bool, False on padding (excluded from the mean).
        target_eviction: the fraction of (layer, KV head, token) rows to evict, in [0, 1].
        alpha: the loss weight.
        per_layer: penalise each layer's mean retention separately (the loss is then the mean over layers of the
            squared gaps) instead of the global mean over all layers.
        per_head: penalise each (layer, KV head) separately. Heads that keep similar fractions make the gated
            cache compact: one layer's storage is as long as its longest head.

    Returns:
        ``(loss, stats)`` with stats from :func:`retention_stats` (floats, detached) for logging.
    """
    if not retain:
        raise ValueError("retain must hold one tensor per gated layer, got none")
    if not 0.0 <= target_eviction <= 1.0:
        raise ValueError(f"target_eviction must lie in [0, 1], got {target_eviction}")
    rho = 1.0 - target_eviction
    means = []
    for layer_retain in retain:
        weight = _valid_weight(layer_retain, valid).to(layer_retain.device)
        if per_head:  # (H,) means, one squared gap per (layer, head)
            means.append((layer_retain.float() * weight).sum(dim=(0, 2)) / weight.sum(dim=(0, 2)).clamp_min(1.0))
        else:
            means.append((layer_retain.float() * weight).sum() / weight.sum().clamp_min(1.0))
    means_t = torch.stack(means)
    if per_layer or per_head:
        loss = alpha * ((means_t - rho) ** 2).mean()
    else:
        loss = alpha * (means_t.mean() - rho) ** 2
    return loss, retention_stats(retain, valid)

