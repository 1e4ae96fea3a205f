"""Byte budgets: setting a policy so that the cache *holds* a target fraction of a dense cache's bytes.

An eviction ratio is not what a user pays for: the gated cache also holds its window ring (``protect_recent``
slots per head, kept or not), the gates' own K'/V' and whole pages. Every function here works with the share
``held_bytes / dense_bytes`` that :meth:`AttnGateCache.memory_report` measures at the end of a prefill:

* :func:`calibrate_gate_bytes` moves one global threshold of the trained gates (a shift of every gate bias, so
  heads keep the different fractions they learned) until a cache filled with the calibration windows holds the
  target share;
* :func:`ratio_for_share` finds the eviction ratio at which a baseline policy holds the target share (baselines
  hold a fixed number of rows per head, so their bytes depend on the length only, not on the text).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..cache.cache import AttnGateCache
from ..cache.memory import MemoryReport
from ..models.calibration import _measured_masks, _shift_for
from ..models.decoder import base_decoder, cache_kwarg
from ..models.model import gate_config, gated_layers


def held_share(report: MemoryReport) -> float:
    """``held_bytes / dense_bytes`` of a :meth:`AttnGateCache.memory_report` (1.0 for an empty cache)."""
    return report.held_bytes / report.dense_bytes if report.dense_bytes else 1.0


@torch.no_grad()
def prefill_report(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   page_size: int = 16) -> Dict[str, Any]:
    """Prefills a fresh :class:`AttnGateCache` with ``input_ids`` through the gated decoder (no LM head) and
    returns its memory report as a dict (:meth:`MemoryReport.as_dict`), with ``held_share`` added."""
    cache = AttnGateCache(page_size)
    base_decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                        **{cache_kwarg(model): cache})
    report = cache.memory_report()
    return {**report.as_dict(), "held_share": held_share(report)}


@torch.no_grad()
def calibrate_gate_bytes(
    model: nn.Module,
    input_ids: torch.Tensor,
    target_share: float,
    attention_mask: Optional[torch.Tensor] = None,
    page_size: int = 16,
    iterations: int = 8,
    tolerance: float = 0.003,
) -> Dict[str, Any]:
    """Shifts every gate bias by one amount so that a cache filled with ``input_ids`` holds ``target_share`` of the
    dense cache's bytes (the gates' K'/V', the window ring and page rounding included), as measured.

    Each step is one cached prefill of the decoder. The next shift comes from the gates' logits of that prefill:
    the rows to add or drop are ``(target - held) * rows of a dense cache``, taken at the quantile of the logits of
    the tokens whose flags decide whether they stay (not the sinks, not the window); once two measurements bracket
    the target, bisection. It stops within ``tolerance`` or after ``iterations`` prefills and leaves the gates at
    the shift whose share is closest to the target, preferring shares at or below it.

    Returns ``{"held_share", "eviction_ratio", "shift", "reachable", "prefills"}``. ``reachable`` is False when the
    target is below what the gates hold while evicting every token they may (sinks, window ring and their own K'/V'
    are always held) or above what they hold while keeping everything; the gates are then left at that extreme.
    """
    if not 0.0 < target_share:
        raise ValueError(f"target_share must be > 0, got {target_share}")
    config = gate_config(model)
    threshold_logit = math.log(config.threshold / (1.0 - config.threshold))
    layers = gated_layers(model)
    # A dense cache's rows per valid token: every decoder layer's KV heads (an ungated sliding-window layer's too,
    # since the dense bytes count it; the gated families have the same KV heads in every layer).
    dense_rows_per_token = len(base_decoder(model).layers) * layers[0].gate.num_model_kv_heads
    base = [attn.gate.score.bias.detach().clone() for attn in layers]
    valid = (attention_mask.bool() if attention_mask is not None
             else torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device))
    eligible, _ = _measured_masks(valid, config.protect_recent, config.sink_tokens)
    tried: List[Tuple[float, float, float]] = []  # (held share, shift, eviction)
    shift, reachable = 0.0, True
    for _ in range(max(iterations, 1)):
        _apply(layers, base, shift)
        report = prefill_report(model, input_ids, attention_mask, page_size)
        share = report["held_share"]
        tried.append((share, shift, report["eviction_ratio"]))
        if abs(share - target_share) <= tolerance:
            break
        over = [t for t in tried if t[0] > target_share]
        under = [t for t in tried if t[0] < target_share]
        if over and under:
            shift = 0.5 * (min(over)[1] + max(under)[1])
            continue
        logits = _eligible_logits(layers, eligible)
        kept = float((logits >= threshold_logit).sum())
        rows = float(valid.sum()) * dense_rows_per_token  # a dense cache's rows
        goal = kept + (target_share - share) * rows
        if (goal <= 0 and kept == 0) or (goal >= logits.numel() and kept == logits.numel()):
            reachable = False  # already at the extreme: every decidable token evicted (or kept)
            break
        shift += _shift_for(logits, goal, threshold_logit)
    share, shift, eviction = _best(tried, target_share, tolerance)
    _apply(layers, base, shift)
    reachable = reachable and abs(share - target_share) <= max(tolerance, 0.01)
    return {"held_share": share, "eviction_ratio": eviction, "shift": shift, "reachable": reachable,
            "prefills": len(tried)}


def _apply(layers: List[nn.Module], base: List[torch.Tensor], shift: float) -> None:
    for attn, bias in zip(layers, base):
        attn.gate.score.bias.copy_(bias + shift)


def _eligible_logits(layers: List[nn.Module], eligible: torch.Tensor) -> torch.Tensor:
    """The gates' logits of the last forward for the tokens whose flags decide what stays, flattened (float64)."""
    probs = torch.stack([attn.last_gate.probs for attn in layers]).double().clamp(1e-30, 1 - 1e-7)  # (L, B, H, T)
    logits = (torch.log(probs) - torch.log1p(-probs)).permute(0, 2, 1, 3)  # (L, H, B, T)
    return logits[:, :, eligible].flatten()


def _best(tried: List[Tuple[float, float, float]], target: float, tolerance: float) -> Tuple[float, float, float]:
    """The measurement closest to the target among those at or below ``target + tolerance``, else the closest."""
    within = [t for t in tried if t[0] <= target + tolerance]
    pool = within or tried
    return min(pool, key=lambda t: abs(t[0] - target))


def window_for_budget(share: float, tokens: int, choices: List[int]) -> int:
    """The gates' window for a byte budget: the largest of ``choices`` that is at most half the rows the budget
    holds per head (``share * tokens / 2``, the recent half of H2O's budget), else the smallest choice."""
    if not choices:
        raise ValueError("window_for_budget needs at least one window")
    fitting = [w for w in choices if w <= share * tokens / 2]
    return max(fitting) if fitting else min(choices)


def ratio_for_share(held_at: Callable[[float], float], target_share: float, iterations: int = 4,
                    tolerance: float = 0.002) -> Dict[str, Any]:
    """The eviction ratio at which a policy holds ``target_share`` of the dense bytes.

    ``held_at(ratio)`` measures the held share at a ratio (a baseline holds ``ceil((1 - ratio) * tokens)`` rows per
    head, plus its ring and page rounding). Starting from ``1 - target``, each step moves the ratio by the share
    still missing; returns ``{"ratio", "held_share", "measurements"}`` for the step closest to the target that
    does not exceed it by more than ``tolerance`` (the closest one otherwise).
    """
    if not 0.0 < target_share <= 1.0:
        raise ValueError(f"target_share must lie in (0, 1], got {target_share}")
    ratio = min(max(1.0 - target_share, 0.0), 0.999)
    tried: List[Tuple[float, float, float]] = []  # (share, ratio, unused)
    for _ in range(max(iterations, 1)):
        share = float(held_at(ratio))
        tried.append((share, ratio, 0.0))
        if abs(share - target_share) <= tolerance or (share < target_share and ratio <= 0.0):
            break
        nxt = min(max(ratio + (share - target_share), 0.0), 0.999)
        if any(abs(nxt - t[1]) < 1e-6 for t in tried):
            break
        ratio = nxt
    share, ratio, _ = _best(tried, target_share, tolerance)
    return {"ratio": ratio, "held_share": share, "measurements": len(tried)}
