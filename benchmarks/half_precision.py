"""bfloat16 against float32 on a real model: does the gated path round worse than the plain model?

Fresh gates keep every token, so the gated model computes what the base model computes; in bfloat16 both round.
Teacher-forced for ``steps`` decode steps after a prefill, each model's logits and greedy tokens are compared with
the float32 model's:

* ``plain``: the base model in bfloat16 with a ``DynamicCache``;
* ``gated``: the same bfloat16 model with fresh gates and an ``AttnGateCache`` (the paged decode steps).

:func:`bf16_agreement` (the half-precision part of the real-model section) measures over ``N`` prompts the disagreement
rate with float32 of each, the positions where exactly one of the two disagrees (a paired count: equal counts mean
no measurable difference), and the logits' max / mean absolute difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from transformers import AutoModelForCausalLM, DynamicCache

import attngate_ext
from attngate_ext import cache_kwarg


def decode_logits(model, ids: torch.Tensor, prompt: int, cache) -> torch.Tensor:
    """Teacher-forced: the logits of the last prompt position and of every decode step after it, float32
    ``(B, steps, V)`` for ``ids`` ``(B, prompt + steps - 1)``."""
    key = cache_kwarg(model)
    out = model(input_ids=ids[:, :prompt], use_cache=True, **{key: cache})
    logits = [out.logits[:, -1].float()]
    for t in range(prompt, ids.shape[1]):
        logits.append(model(input_ids=ids[:, t : t + 1], use_cache=True, **{key: cache}).logits[:, -1].float())
    return torch.stack(logits, dim=1)


@torch.no_grad()
def bf16_agreement(model_dir: Path, ids: torch.Tensor, prompt: int, device: torch.device) -> Dict[str, float]:
    """``ids`` ``(N, prompt + steps - 1)``: N real-text windows. Returns the rates and counts described above."""
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    ids = ids.to(device)
    want = decode_logits(reference, ids, prompt, DynamicCache())
    del reference
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    plain = decode_logits(model, ids, prompt, DynamicCache())
    attngate_ext.add_attention_gates(model)
    gated = decode_logits(model, ids, prompt, attngate_ext.AttnGateCache())
    top = want.argmax(-1)
    plain_wrong, gated_wrong = plain.argmax(-1) != top, gated.argmax(-1) != top
    positions = top.numel()
    return {
        "prompts": ids.shape[0], "steps": want.shape[1], "positions": positions,
        "plain_disagreement": float(plain_wrong.float().mean()),
        "gated_disagreement": float(gated_wrong.float().mean()),
        "only_plain_wrong": int((plain_wrong & ~gated_wrong).sum()),
        "only_gated_wrong": int((gated_wrong & ~plain_wrong).sum()),
        "plain_max_abs": float((plain - want).abs().max()), "gated_max_abs": float((gated - want).abs().max()),
        "plain_mean_abs": float((plain - want).abs().mean()), "gated_mean_abs": float((gated - want).abs().mean()),
        "gated_vs_plain_max_abs": float((gated - plain).abs().max()),
    }


def describe(result: Dict[str, float]) -> str:
    """Two lines for the report."""
    r = result
    return (f"    greedy token vs float32, {r['prompts']} prompts x {r['steps']} teacher-forced steps: plain bf16 "
            f"disagrees at {r['plain_disagreement']:.2%}, gated bf16 at {r['gated_disagreement']:.2%} (only plain "
            f"wrong: {r['only_plain_wrong']}, only gated wrong: {r['only_gated_wrong']})\n"
            f"    logits vs float32: plain max |diff| {r['plain_max_abs']:.3f} (mean {r['plain_mean_abs']:.4f}), gated "
            f"{r['gated_max_abs']:.3f} (mean {r['gated_mean_abs']:.4f}); gated vs plain max |diff| "
            f"{r['gated_vs_plain_max_abs']:.3f}")
