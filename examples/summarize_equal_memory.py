#!/usr/bin/env python
"""Tables of equal-bytes results: gate rows of several runs against the baselines of one run, per budget.

    python examples/summarize_equal_memory.py runs/val/validation-plays-val-1024-base.json \\
        runs/val/validation-plays-val-1024-shipped-w128.json [...]

Every file is an ``evaluate --budgets`` output (``examples/equal_memory_smollm2.py`` writes them). The first file's
dense and baseline rows are the reference; every gate row of every file becomes one line, labelled by its file
name, with its perplexity, eviction needed and held share per budget, and its perplexity relative to H2O's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional


def rows(path: Path) -> List[Dict[str, Any]]:
    return [r for r in json.loads(path.read_text())["results"]]


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
            label = f.stem.split("-", 3)[-1]
            lines.append(f"| gates ({label}) | " + " | ".join(
                cell(find(rs, "gate", b), find(reference, "h2o", b)) for b in budgets) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table([Path(p) for p in sys.argv[1:]]))
