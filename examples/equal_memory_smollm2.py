#!/usr/bin/env python
"""SmolLM2-135M-Instruct: the gates against the heuristics at equal held bytes, per domain and length.

    python examples/equal_memory_smollm2.py --split validation [--lengths 1024+128 4096+256] [--out DIR]
    python examples/equal_memory_smollm2.py --split test --gates DIR      # once, at the end

Each (domain, length) is one ``python -m attngate_ext.evaluate --budgets ...`` run: windows of context +
continuation tokens evenly spaced over the domain's text, perplexity of the continuations, every policy evicting in
context and set to hold each budget (a fraction of the dense cache's bytes, measured at the end of the window);
the gates' threshold is set on the domain's calibration text, which is never scored
(``examples/mixed_corpus.py``). Writes ``OUT/<split>-<domain>-<context>.json`` and prints one table per run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from attngate_ext.evaluate import main as evaluate_main  # noqa: E402
from attngate_ext.evaluation.equal_bytes import budget_table  # noqa: E402
from mixed_corpus import corpus  # noqa: E402
from real_assets import smollm2_dir  # noqa: E402


def domains(split: str) -> Dict[str, Tuple[List[Path], List[Path]]]:
    """``{domain: (scored files, calibration files)}`` of the validation or the test split."""
    c = corpus()
    if split == "validation":
        return {"plays-val": (c["plays"].validation, c["plays"].calibration),
                "docs-val": (c["docs"].validation, c["docs"].calibration),
                "milton-val": (c["milton"].validation, c["milton"].calibration)}
    return {"plays": (c["plays"].test["plays"], c["plays"].calibration),
            "python-docs": (c["docs"].test["python-docs"], c["docs"].calibration),
            "c-api": (c["docs"].test["c-api"], c["docs"].calibration)}


def parse_length(text: str) -> Tuple[int, int]:
    context, continuation = text.split("+")
    return int(context), int(continuation)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", choices=["validation", "test"], required=True)
    p.add_argument("--domains", nargs="+", help="default: every domain of the split")
    p.add_argument("--lengths", nargs="+", default=["1024+128"], help="context+continuation tokens")
    p.add_argument("--windows", nargs="+", type=int, default=[24],
                   help="windows per domain, one number per --lengths entry (or one for all)")
    p.add_argument("--budgets", nargs="+", default=["0.5", "0.25"])
    p.add_argument("--policies", nargs="+", default=["gate", "streaming_llm", "h2o", "snapkv"])
    p.add_argument("--gates", help="gates to evaluate (default: the shipped ones)")
    p.add_argument("--gate-window", type=int, help="evaluate the gates with this protect_recent")
    p.add_argument("--gate-attention-window", type=int, help="evaluate the gates with this attention_window")
    p.add_argument("--gate-window-choices", nargs="+", help="the gates' window per budget (evaluate's option)")
    p.add_argument("--calibration", choices=["global", "per_head"], default="global")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--calibration-windows", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--out", default=str(ROOT / "runs" / "equal-memory"))
    args = p.parse_args()
    table = domains(args.split)
    names = args.domains or list(table)
    windows = args.windows * len(args.lengths) if len(args.windows) == 1 else args.windows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for length, count in zip(args.lengths, windows):
        context, continuation = parse_length(length)
        for name in names:
            text, calibration = table[name]
            path = out / f"{args.split}-{name}-{context}{args.tag}.json"
            evaluate_main([
                "--model", str(smollm2_dir()), *(["--gates", args.gates] if args.gates else []),
                *(["--gate-window", str(args.gate_window)] if args.gate_window else []),
                *([] if args.gate_attention_window is None else
                  ["--gate-attention-window", str(args.gate_attention_window)]),
                "--calibration", args.calibration,
                *(["--gate-window-choices", *args.gate_window_choices] if args.gate_window_choices else []),
                "--text", *map(str, text), "--calibration-text", *map(str, calibration),
                "--calibration-windows", str(args.calibration_windows), "--policies", *args.policies,
                "--modes", "in_context", "--ratios", "--budgets", *args.budgets,
                "--context-len", str(context), "--continuation-len", str(continuation), "--windows", str(count),
                "--batch-size", str(args.batch_size), "--page-size", str(args.page_size), "--no-progress",
                *(["--no-dense"] if args.no_dense else []), "--out", str(path),
            ])
            written.append(path)
    for path in written:
        print(f"\n{path.name}\n{budget_table(json.loads(path.read_text())['results'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
