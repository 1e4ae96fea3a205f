"""bfloat16 against float32 on a real model: does the gated path round worse than the plain model?

Fresh gates keep every token, so the gated model computes what the base model computes; in bfloat16 both round.
Teacher-forced for ``steps`` decode steps after a prefill, each model's logits and greedy tokens are compared with
the float32 model's:

* ``plain``: the base model in bfloat16 with a ``DynamicCache``;
* ``gated``: the same bfloat16 model with fresh gates and an ``AttnGateCache`` (the paged decode steps).

:func:`fresh_gates_against_float32` is the half-precision part of the real-model section (one prompt: logits and the
first greedy token that differs); :func:`bf16_agreement` measures over ``N`` prompts the disagreement rate with
float32 of each, the positions where exactly one of the two disagrees (a paired count: equal counts mean no
measurable difference), and the logits' max / mean absolute difference.
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


def greedy_tokens(model, ids: torch.Tensor, steps: int, cache) -> torch.Tensor:
    """``steps`` greedy tokens ``(B, steps)`` after the prompt ``ids``."""
    key = cache_kwarg(model)
    token = model(input_ids=ids, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
    tokens = [token]
    for _ in range(steps - 1):
        token = model(input_ids=token, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def fresh_gates_against_float32(model_dir: Path, ids: torch.Tensor, prompt: int,
                                device: torch.device) -> Dict[str, float]:
    """Fresh gates in bf16 against the plain bf16 model, both measured against the float32 model, on ``ids``
    ``(B, prompt + steps)``: the logits of the ``steps`` teacher-forced positions and ``steps`` greedy tokens."""
    models = {dtype: AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
              for dtype in (torch.float32, torch.bfloat16)}
    steps = ids.shape[1] - prompt
    forced = ids[:, :-1]  # the last token is never fed
    reference = decode_logits(models[torch.float32], forced, prompt, DynamicCache())
    greedy_ref = greedy_tokens(models[torch.float32], ids[:, :prompt], steps, DynamicCache())
    plain = decode_logits(models[torch.bfloat16], forced, prompt, DynamicCache())
    greedy_plain = greedy_tokens(models[torch.bfloat16], ids[:, :prompt], steps, DynamicCache())
    attngate_ext.add_attention_gates(models[torch.bfloat16])
    gated = decode_logits(models[torch.bfloat16], forced, prompt, attngate_ext.AttnGateCache())
    greedy_gated = greedy_tokens(models[torch.bfloat16], ids[:, :prompt], steps, attngate_ext.AttnGateCache())

    def first_flip(tokens: torch.Tensor) -> int:
        differs = (tokens != greedy_ref).any(dim=0).nonzero()
        return int(differs[0]) if differs.numel() else steps

    return {"steps": steps,
            "plain_max_abs": float((plain - reference).abs().max()),
            "gated_max_abs": float((gated - reference).abs().max()),
            "plain_mean_abs": float((plain - reference).abs().mean()),
            "gated_mean_abs": float((gated - reference).abs().mean()),
            "plain_first_greedy_flip": first_flip(greedy_plain),
            "gated_first_greedy_flip": first_flip(greedy_gated)}


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
