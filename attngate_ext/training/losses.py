"""The eviction loss (docs/training.md) and the retention statistics logged during training."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..models.model import gated_layers


def collect_retention(model: nn.Module) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """The retention weights ``F`` ``(B, H, T)`` of every gated layer from the model's last forward, and its padding
    mask ``(B, T)`` (None when there was none). ``F`` is differentiable when the gates were being trained."""
    layers = gated_layers(model)
    retain = [attn.last_retain for attn in layers]
    if any(r is None for r in retain):
        raise RuntimeError("run a forward pass of the gated model before collecting its retention")
    return retain, layers[0].last_valid


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
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    processes: int = 1,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """``alpha * (mean retention - rho)^2`` with ``rho = 1 - target_eviction`` (docs/training.md).

    Args:
        retain: per layer, the retention weights ``F`` ``(B, H, T)`` (straight-through flags: the forward value is the
            hard flag, the gradient is the sigmoid's), e.g. from :func:`collect_retention`.
        valid: ``(B, T)`` bool, False on padding (excluded from the mean).
        target_eviction: the fraction of (layer, KV head, token) rows to evict, in [0, 1].
        alpha: the loss weight.
        per_layer: penalise each layer's mean retention separately (the loss is then the mean over layers of the
            squared gaps) instead of the global mean over all layers.
        per_head: penalise each (layer, KV head) separately, instead of letting heads keep different fractions.
        reduce: data-parallel training: a function summing a tensor over the ``processes`` processes (an
            all-reduce). The means are then those of the whole global batch, and the loss is built so that the
            mean of the processes' gradients is the gradient of that global loss (its value is the global loss).

    Returns:
        ``(loss, stats)`` with stats from :func:`retention_stats` (floats, detached, this process's batch) for logging.
    """
    if not retain:
        raise ValueError("retain must hold one tensor per gated layer, got none")
    if not 0.0 <= target_eviction <= 1.0:
        raise ValueError(f"target_eviction must lie in [0, 1], got {target_eviction}")
    rho = 1.0 - target_eviction
    sums, counts = [], []
    for layer_retain in retain:
        weight = _valid_weight(layer_retain, valid).to(layer_retain.device)
        dims = (0, 2) if per_head else (0, 1, 2)  # per head: (H,) sums, one squared gap per (layer, head)
        sums.append((layer_retain.float() * weight).sum(dim=dims))
        counts.append(weight.sum(dim=dims))
    sums_t, counts_t = torch.stack(sums), torch.stack(counts)

    def penalty(means: torch.Tensor) -> torch.Tensor:
        if per_layer or per_head:
            return alpha * ((means - rho) ** 2).mean()
        return alpha * (means.mean() - rho) ** 2

    if reduce is None:
        return penalty(sums_t / counts_t.clamp_min(1.0)), retention_stats(retain, valid)
    total_counts = reduce(counts_t.detach().clone()).clamp_min(1.0)
    means = (reduce(sums_t.detach().clone()) / total_counts).requires_grad_(True)
    value = penalty(means)
    (grad,) = torch.autograd.grad(value, means)
    # Zero-valued term whose gradient is this process's share of d(global loss): averaged over the processes, the
    # gradients sum every process's d(sums) / total_counts.
    share = (grad * processes * (sums_t - sums_t.detach()) / total_counts).sum()
    return value.detach() + share, retention_stats(retain, valid)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      mask: Optional[torch.Tensor] = None, temperature: float = 1.0) -> torch.Tensor:
    """Mean over the tokens of ``KL(teacher || student)`` of the next-token distributions (logit distillation).

    The teacher is the same frozen model with every token kept, so the gates learn to evict what the model's
    predictions do not need, whatever the text's labels say.

    Args:
        student_logits, teacher_logits: ``(B, T, V)``; the teacher's carry no gradient.
        mask: ``(B, T)`` bool/0-1, the positions that count (e.g. non-padding); None counts every position.
        temperature: softmax temperature of both distributions (the loss is scaled by ``temperature**2``).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    # KL >= 0, but a token whose two distributions (nearly) agree can round to a tiny negative number.
    per_token = (teacher.exp() * (teacher - student)).sum(dim=-1).clamp_min(0.0)  # (B, T)
    if mask is None:
        return per_token.mean() * temperature**2
    weight = mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0) * temperature**2


def eviction_target(step: int, final: float, ramp_steps: int = 0) -> float:
    """The eviction target at optimizer step ``step`` (0-based): a linear ramp from 0 to ``final`` over
    ``ramp_steps`` steps, then ``final`` (``ramp_steps = 0``: ``final`` from the start)."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return final
    return final * (step + 1) / ramp_steps
