#!/usr/bin/env python
"""SmolLM2-135M-Instruct: needle retrieval at equal held bytes, every policy against the dense model.

    python examples/retrieval_smollm2.py --split test [--per-cell 2] [--out FILE]

A fact ("The special magic number for <word> is 4711.") is hidden at depths 0.1 ... 0.9 of 2048- and 3584-token
stretches of real text, with the question at the end; an example counts when every answer token is the model's
most likely next token while the policy evicts in context and holds the budget (``python -m attngate_ext.evaluate
--retrieval-text``). The filler is the tutorial + HOWTO documentation (``--split test``) or the documentation
validation files (``--split validation``); the gates' threshold and the baselines' ratios are set on the FAQ,
which is never scored (``examples/mixed_corpus.py``). Extra arguments go to ``evaluate`` unchanged, e.g.
``--gate-window-choices 128 256 --gate-attention-window 128``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from attngate_ext.evaluate import main as evaluate_main  # noqa: E402
from mixed_corpus import corpus  # noqa: E402
from real_assets import smollm2_dir  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", choices=["validation", "test"], required=True)
    p.add_argument("--budgets", nargs="+", default=["0.5", "0.25"])
    p.add_argument("--policies", nargs="+", default=["gate", "streaming_llm", "h2o", "snapkv"])
    p.add_argument("--per-cell", type=int, default=2, help="examples per (length, depth)")
    p.add_argument("--calibration-windows", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "runs" / "retrieval.json"))
    args, extra = p.parse_known_args()
    docs = corpus()["docs"]
    filler = docs.test["python-docs"] if args.split == "test" else docs.validation
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    return evaluate_main([
        "--model", str(smollm2_dir()), "--retrieval-text", *map(str, filler),
        "--calibration-text", *map(str, docs.calibration), "--calibration-windows", str(args.calibration_windows),
        "--retrieval-per-cell", str(args.per_cell), "--policies", *args.policies, "--modes", "in_context",
        "--ratios", "--budgets", *args.budgets, "--batch-size", "1", "--no-progress", "--out", args.out, *extra])


if __name__ == "__main__":
    raise SystemExit(main())
