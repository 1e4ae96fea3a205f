"""Counts the operators one gated attention layer runs per decode step, with ``torch.profiler``.

Every ``self_attn`` forward of the model is wrapped in a ``record_function`` range; an operator counts when it is
an ``aten::`` / ``attngate::`` call directly under that range (the ops the layer's Python code issues, not the ops
those ops call internally). The dense model's attention is counted the same way for comparison.

    python benchmarks/op_count.py [-v]     # a tiny random Llama, batch 2, 64-token prompt, 16 decode steps
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import attngate_ext  # noqa: E402
from benchmarks.printer import without_profiler_noise  # noqa: E402

_RANGE = "attngate_bench::self_attn"


@contextlib.contextmanager
def _ranged_attention(model: torch.nn.Module) -> Iterator[None]:
    """Wraps the forward of every decoder layer's ``self_attn`` in a profiler range."""
    originals = []
    for layer in model.model.layers:
        attn = layer.self_attn
        original = attn.forward

        def forward(*args, _original=original, **kwargs):
            with record_function(_RANGE):
                return _original(*args, **kwargs)

        originals.append((attn, original))
        attn.forward = forward
    try:
        yield
    finally:
        for attn, original in originals:
            attn.forward = original


def op_names(model: torch.nn.Module, steps: List[Dict[str, object]]) -> Counter:
    """Operators issued directly by the attention layers during ``model(**step)`` for every step, by name, over
    all layers and steps."""
    with _ranged_attention(model), without_profiler_noise(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in steps:
            model(**step)
    names: Counter = Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if parent is not None and parent.name == _RANGE and event.name.startswith(("aten::", "attngate::")):
            names[event.name] += 1
    return names


@torch.no_grad()
def count(batch: int = 2, prompt: int = 64, steps: int = 16, window: int = 1, sinks: int = 0,
          verbose: bool = False) -> Dict[str, float]:
    """Ops per attention layer per decode step (the mean over ``steps`` steps, so that the occasional page-table
    or pool growth counts at its real rate): dense (DynamicCache) and gated (AttnGateCache)."""
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (batch, prompt + steps))
    key = attngate_ext.cache_kwarg(model)
    result = {}
    for mode in ("dense", "gated"):
        if mode == "gated":
            attngate_ext.add_attention_gates(model, attngate_ext.AttentionGateConfig(
                head_dim=8, protect_recent=window, sink_tokens=sinks))
        cache = attngate_ext.AttnGateCache() if mode == "gated" else DynamicCache()
        model(input_ids=ids[:, :prompt], use_cache=True, **{key: cache})
        decode = [dict(input_ids=ids[:, t : t + 1], use_cache=True, **{key: cache})
                  for t in range(prompt, prompt + steps)]
        names = op_names(model, decode)
        result[mode] = sum(names.values()) / len(model.model.layers) / steps
        if verbose:
            print(mode, {name: n / steps for name, n in names.most_common()})
    return result


if __name__ == "__main__":
    for w in (1, 16):
        counts = count(window=w, sinks=4 if w > 1 else 0, verbose="-v" in sys.argv)
        print(f"w={w}: ops per attention layer per decode step: dense {counts['dense']:.0f}, "
              f"gated {counts['gated']:.0f}")
