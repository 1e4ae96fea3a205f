#!/usr/bin/env python
"""Tables of equal-bytes results: gate rows of several runs against the baselines of one run, per budget.

    python examples/summarize_equal_memory.py runs/val/validation-plays-val-1024-base.json \\
        runs/val/validation-plays-val-1024-shipped-w128.json [...]

Every file is an ``evaluate --budgets`` output (``examples/equal_memory_smollm2.py`` writes them). The first file's
dense and baseline rows are the reference; every gate row of every file becomes one line, labelled by its file
name, with its perplexity, eviction needed and held share per budget, and its perplexity relative to H2O's.
``--heads`` adds, per gate row, how the retention of its (layer, KV head) pairs is spread: the per-head budgets the
gates chose under one global threshold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional


def rows(path: Path) -> List[Dict[str, Any]]:
    return [r for r in json.loads(path.read_text())["results"]]


def label(path: Path) -> str:
    """A result file's name without its split: ``validation-plays-val-1024-chosen`` -> ``plays-val-1024-chosen``."""
    return path.stem.split("-", 1)[-1]


def cell(r: Optional[Dict[str, Any]], h2o: Optional[Dict[str, Any]]) -> str:
    if r is None or "perplexity" not in r:
        return "-"
    text = f"{r['perplexity']:.2f} / {r['eviction_ratio']:.3f} / {r['held_share']:.3f}"
    if not r.get("reachable", True):
        text += " (out of reach)"
    if h2o is not None and r["policy"] != "h2o":
        text += f" ({100 * (r['perplexity'] / h2o['perplexity'] - 1):+.1f}% vs H2O)"
    return text


def table(files: List[Path]) -> str:
    """Markdown comparing every gate row with the baselines of ``files[0]`` (see the module docstring)."""
    reference = rows(files[0])
    budgets = sorted({r["target_share"] for f in files for r in rows(f) if "target_share" in r}, reverse=True)
    find = lambda rs, policy, b: next((r for r in rs if r["policy"] == policy and r.get("target_share") == b), None)  # noqa: E731
    lines = ["| policy | " + " | ".join(f"{b:.2f} of dense: ppl / evicted / held" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    dense = next((r for f in files for r in rows(f) if r["policy"] == "dense"), None)
    if dense is not None:
        lines.append("| dense | " + " | ".join(f"{dense['perplexity']:.2f}" for _ in budgets) + " |")
    for policy in ("h2o", "streaming_llm", "snapkv"):
        if any(find(reference, policy, b) for b in budgets):
            lines.append(f"| {policy} | " + " | ".join(cell(find(reference, policy, b), None) for b in budgets)
                         + " |")
    for f in files:
        rs = rows(f)
        if any(find(rs, "gate", b) for b in budgets):
            lines.append(f"| gates ({label(f)}) | " + " | ".join(
                cell(find(rs, "gate", b), find(reference, "h2o", b)) for b in budgets) + " |")
    return "\n".join(lines)


def head_spread(files: List[Path]) -> str:
    """Markdown: per gate row, quantiles of the retention (kept fraction) over its (layer, KV head) pairs."""
    lines = ["| gates | budget | heads | min | 10% | median | 90% | max | heads keeping < 10% | heads keeping > 90% |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f in files:
        for r in rows(f):
            if r["policy"] != "gate" or "retention_per_head" not in r:
                continue
            kept = sorted(x for layer in r["retention_per_head"] for x in layer)
            q = lambda p: kept[min(len(kept) - 1, int(p * len(kept)))]  # noqa: E731
            lines.append(f"| {label(f)} | {r.get('target_share', r.get('target_eviction'))} | "
                         f"{len(kept)} | {kept[0]:.2f} | {q(0.1):.2f} | {q(0.5):.2f} | {q(0.9):.2f} | {kept[-1]:.2f} | "
                         f"{sum(x < 0.1 for x in kept)} | {sum(x > 0.9 for x in kept)} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="evaluate --budgets outputs; the first gives the baselines")
    p.add_argument("--heads", action="store_true", help="also the spread of the gates' retention per (layer, KV head)")
    args = p.parse_args()
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        p.error(f"no such result file: {', '.join(missing)}")
    print(table(args.files))
    if args.heads:
        print("\n" + head_spread(args.files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
