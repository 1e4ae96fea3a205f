"""Setting gate biases so that a gated model evicts a chosen fraction of tokens (benchmarks, tests, budgets)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .model import _decoder, gate_config, gates


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
    decoder = _decoder(model)
    for layer in decoder.layers:
        decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)  # no LM head needed
        attn = layer.self_attn
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
