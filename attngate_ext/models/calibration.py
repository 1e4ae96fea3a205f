"""Setting gate biases so that a gated model evicts a chosen fraction of tokens (benchmarks, tests, budgets)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .decoder import base_decoder
from .model import gate_config, gated_layers, gates


def randomize_gates(model: nn.Module, seed: int = 0, spread: float = 4.0) -> None:
    """Gives every gate random scoring weights (``W_g`` with logits of std ~``spread``) and a zero bias.

    An untrained stand-in for a trained gate: its decisions depend on the tokens and differ per head. Use
    :func:`calibrate_gate_bias` afterwards to reach a target eviction ratio.
    """
    generator = torch.Generator().manual_seed(seed)
    for gate in gates(model):
        weight = gate.score.weight
        fan_in = weight.shape[1]
        values = torch.randn(weight.shape, generator=generator) * (spread / math.sqrt(fan_in))
        with torch.no_grad():
            weight.copy_(values.to(weight))
            gate.score.bias.zero_()


@torch.no_grad()
def calibrate_gate_bias(
    model: nn.Module,
    input_ids: torch.Tensor,
    eviction_ratio: float,
    attention_mask: Optional[torch.Tensor] = None,
) -> None:
    """Shifts each gate's bias, per KV head, so that it evicts ``eviction_ratio`` of the tokens of ``input_ids``.

    Layers are calibrated in order (a layer's gate input depends on the flags of the layers before it), with one
    no-cache forward per layer. Sink tokens are always kept, so the measured ratio can be slightly lower.
    """
    if not 0.0 <= eviction_ratio <= 1.0:
        raise ValueError(f"eviction_ratio must lie in [0, 1], got {eviction_ratio}")
    threshold_logit = math.log(gate_config(model).threshold / (1.0 - gate_config(model).threshold))
    decoder = base_decoder(model)
    for attn in gated_layers(model):
        decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)  # no LM head needed
        probs = attn.last_gate.probs.double().clamp(1e-12, 1 - 1e-12)  # (B, H, T)
        logits = torch.log(probs) - torch.log1p(-probs)
        H = logits.shape[1]
        per_head = logits.transpose(0, 1).reshape(H, -1)
        if attention_mask is not None:
            valid = attention_mask.bool().unsqueeze(0).expand(H, -1, -1).reshape(H, -1)
        else:
            valid = torch.ones_like(per_head, dtype=torch.bool)
        shift = torch.empty(H, dtype=torch.float64)
        for h in range(H):
            scores = per_head[h][valid[h]]
            if eviction_ratio <= 0.0:
                shift[h] = threshold_logit - scores.min() + 1.0
            elif eviction_ratio >= 1.0:
                shift[h] = threshold_logit - scores.max() - 1.0
            else:
                # Put the threshold halfway between the two scores around the requested quantile.
                ordered = scores.sort().values
                k = min(max(int(round(eviction_ratio * ordered.numel())), 1), ordered.numel() - 1)
                shift[h] = threshold_logit - 0.5 * (ordered[k - 1] + ordered[k])
        bias = attn.gate.score.bias
        bias.add_(shift.to(bias))


def set_constant_gates(model: nn.Module, keep: bool) -> None:
    """Makes every gate keep (or evict) every token regardless of its input.

    With ``keep=False``, ``sink_tokens = s`` and ``protect_recent = w`` the gated model is exactly StreamingLLM
    (s attention sinks plus a window of the w most recent tokens) on the same cache machinery
    (docs/design.md, section 2).
    """
    for gate in gates(model):
        with torch.no_grad():
            gate.score.weight.zero_()
            gate.score.bias.fill_(30.0 if keep else -30.0)


def _measured_masks(valid: torch.Tensor, window: int, sinks: int) -> tuple:
    """``(eligible, forced)`` ``(B, T)``: tokens whose flag decides whether a cache still holds them at the end of
    the sequence, and tokens it holds whatever their flag (sinks, and the last ``window - 1`` valid tokens, still
    pending inside the protected window)."""
    position = valid.long().cumsum(dim=1) - 1
    count = valid.sum(dim=1, keepdim=True)
    forced = valid & ((position < sinks) | (position >= count - (window - 1)))
    return valid & ~forced, forced


def _shift_for(scores: torch.Tensor, keep: float, threshold_logit: float) -> float:
    """The logit shift that puts ``threshold_logit`` between the ``keep`` highest ``scores`` and the rest."""
    if scores.numel() == 0:
        return 0.0
    ordered = scores.sort(descending=True).values
    k = int(round(keep))
    if k <= 0:
        return threshold_logit - float(ordered[0]) - 1.0
    if k >= ordered.numel():
        return threshold_logit - float(ordered[-1]) + 1.0
    return threshold_logit - 0.5 * float(ordered[k - 1] + ordered[k])


@torch.no_grad()
def calibrate_gate_threshold(
    model: nn.Module,
    input_ids: torch.Tensor,
    eviction_ratio: float,
    attention_mask: Optional[torch.Tensor] = None,
    per_head: bool = False,
    iterations: int = 6,
    tolerance: float = 0.004,
) -> float:
    """Shifts the gates' biases so that a cache filled with ``input_ids`` evicts ``eviction_ratio`` *as measured*
    by :meth:`AttnGateCache.memory_report` at the end of the sequence: a head still holds the sinks and the last
    ``protect_recent - 1`` tokens whatever their flags, so only the other tokens' flags are moved.

    ``per_head=False`` adds one shift to every gate (a global threshold on the gates' logits): the differences the
    gates learned between layers and heads stay, so heads keep different fractions (learned per-head budgets).
    ``per_head=True`` shifts each (layer, KV head) to evict the ratio on its own.

    Every step is one no-cache forward (a layer's gate input depends on the flags of the layers before it): the
    shift is moved to the quantile of the logits just seen, or, once two measurements bracket the ratio, halfway
    between them; it stops within ``tolerance`` or after ``iterations`` forwards and keeps the best
    shift seen. Returns the measured eviction of that shift.
    """
    if not 0.0 <= eviction_ratio <= 1.0:
        raise ValueError(f"eviction_ratio must lie in [0, 1], got {eviction_ratio}")
    config = gate_config(model)
    threshold_logit = math.log(config.threshold / (1.0 - config.threshold))
    decoder = base_decoder(model)
    layers = gated_layers(model)
    valid = (attention_mask.bool() if attention_mask is not None
             else torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device))
    eligible, forced = _measured_masks(valid, config.protect_recent, config.sink_tokens)
    H = layers[0].gate.score.bias.numel()
    base = [attn.gate.score.bias.detach().clone() for attn in layers]
    shift = torch.zeros(len(layers), H, dtype=torch.float64)  # applied on top of the original biases
    tried = []  # (measured eviction, shift)
    for _ in range(max(iterations, 1)):
        for attn, bias, row in zip(layers, base, shift):
            attn.gate.score.bias.copy_(bias + row.to(bias))
        decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        flags = torch.stack([attn.last_gate.keep for attn in layers])  # (L, B, H, T)
        held = (flags & eligible.unsqueeze(1)) | forced.unsqueeze(1)
        total = float(valid.sum()) * flags.shape[0] * flags.shape[2]
        measured = 1.0 - float(held.sum()) / total
        tried.append((measured, shift.clone()))
        if abs(measured - eviction_ratio) <= tolerance:
            break
        above = [t for t in tried if t[0] > eviction_ratio]  # evicting too much: the shift must grow
        below = [t for t in tried if t[0] < eviction_ratio]
        if above and below and not per_head:
            hi = min(above, key=lambda t: t[0])
            lo = max(below, key=lambda t: t[0])
            shift = 0.5 * (hi[1] + lo[1])  # bisection: robust where ties make the ratio jump
            continue
        probs = torch.stack([attn.last_gate.probs for attn in layers]).double().clamp(1e-30, 1 - 1e-7)
        logits = (torch.log(probs) - torch.log1p(-probs)).permute(0, 2, 1, 3)[:, :, eligible]  # (L, H, tokens)
        if per_head:
            keep = (1.0 - eviction_ratio) * float(valid.sum()) - float(forced.sum())
            for l in range(len(layers)):
                for h in range(H):
                    shift[l, h] += _shift_for(logits[l, h], keep, threshold_logit)
        else:
            keep = (1.0 - eviction_ratio) * total - float(forced.sum()) * len(layers) * H
            shift += _shift_for(logits.flatten(), keep, threshold_logit)
    measured, best = min(tried, key=lambda t: abs(t[0] - eviction_ratio))
    for attn, bias, row in zip(layers, base, best):
        attn.gate.score.bias.copy_(bias + row.to(bias))
    return measured
