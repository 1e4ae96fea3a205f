#!/usr/bin/env python
"""RULER (lm-evaluation-harness's offline long-context tasks) on SmolLM2-135M-Instruct: dense, the shipped gates, H2O.

    python examples/lm_eval_ruler.py [--limit 5] [--context-len 4096] [--ratio 0.5] [--out runs/lm-eval-ruler]

Runs lm-eval's ``niah_single_1`` (one 7-digit number hidden in a repeated filler text) and ``ruler_vt`` (variable
tracking: which variables a chain of assignments gives a value) at one context length, each policy on a fresh
copy of the model through :func:`attngate_ext.evaluation.lm_eval.gated_lm` (the harness's ``HFLM`` with every call
through an ``AttnGateCache``). The gates are set to ``--ratio`` with the shift shipped with them; H2O evicts
``--ratio`` of every prompt, in context. Prints one row per (policy, task): the score (RULER's: the share of the
expected strings found in the answer), the eviction and KV share the caches measured, and the wall time of the run
(data generation included). Needs ``pip install .[eval]`` and the assets of ``examples/real_assets.py``.

Offline: RULER makes its documents itself, sized with the model's tokenizer (the local SmolLM2 directory); these two
tasks need neither the essays nor nltk's sentence splitter (lm-eval tries to download ``punkt_tab`` when the
module is imported, and goes on when that fails), and ``wonderwords`` ships its word lists.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from attngate_ext.evaluation.lm_eval import evaluate_tasks, gated_lm, metric_values  # noqa: E402
from attngate_ext.training import utils  # noqa: E402
from real_assets import smollm2_dir  # noqa: E402

TASKS = ("niah_single_1", "ruler_vt")
POLICIES = ("dense", "gate", "h2o")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=utils.HelpWithDefaults)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), help="RULER task names")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=["dense", "gate", "h2o", "snapkv",
                                                                             "streaming_llm"],
                   help="eviction policies, each on a fresh model")
    p.add_argument("--ratio", type=float, default=0.5, help="eviction ratio of the gates and the baselines")
    p.add_argument("--context-len", type=int, default=4096, help="RULER's sequence length (max_seq_lengths)")
    p.add_argument("--limit", type=int, default=5, help="documents per task (on 2 CPU cores each takes 20-50 s)")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap the prompts in the model's chat template (the harness's apply_chat_template)")
    p.add_argument("--dtype", choices=list(utils.DTYPES), default="float32", help="dtype of the model")
    p.add_argument("--device", default=None, help="device (default: cuda when available, else cpu)")
    p.add_argument("--out", default=str(ROOT / "runs" / "lm-eval-ruler"), help="directory of results.json")
    args = p.parse_args(argv)
    if not 0.0 <= args.ratio < 1.0:
        p.error(f"--ratio must lie in [0, 1), got {args.ratio}")
    utils.require(p, args, [("context_len", utils.at_least_one, ">= 1"), ("limit", utils.at_least_one, ">= 1")])
    return args


def ruler_task_dir() -> Optional[str]:
    """The harness's RULER task folder: indexing only it skips indexing the harness's thousands of tasks."""
    import lm_eval.tasks

    folder = Path(lm_eval.tasks.__file__).parent / "ruler"
    return str(folder) if folder.is_dir() else None


def run_policy(policy: str, args: argparse.Namespace, model_dir: str, device: str) -> List[Dict[str, Any]]:
    """Every task under ``policy`` on a freshly loaded model; one row per task."""
    model, tokenizer = utils.load_local_model(model_dir, args.dtype, device)
    ratio = None if policy == "dense" else args.ratio
    lm = gated_lm(model, tokenizer, policy, ratio=ratio, max_length=args.context_len + 256)
    folder = ruler_task_dir()
    rows = []
    for task in args.tasks:
        out = evaluate_tasks(lm, [task], limit=args.limit, include_path=folder, include_defaults=folder is None,
                             metadata={"pretrained": model_dir, "max_seq_lengths": [args.context_len]},
                             apply_chat_template=args.chat_template)
        tally = out["eviction"][task].get("generate_until", {})
        rows.append({"policy": policy, "task": task, "ratio": ratio,
                     "score": metric_values(out["results"][task]).get(str(args.context_len)),
                     "eviction_ratio": tally.get("eviction_ratio"), "kv_share": tally.get("kv_share"),
                     "documents": tally.get("calls"), "seconds": out["seconds"][task]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: List[Dict[str, Any]], args: argparse.Namespace) -> str:
    """Markdown: one row per (policy, task)."""
    lines = [f"RULER at {args.context_len} tokens, {args.limit} documents per task, SmolLM2-135M-Instruct, "
             f"{args.dtype}", "",
             "| policy | task | score | evicted | KV share | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda x, form: "-" if x is None else format(x, form)  # noqa: E731
        name = r["policy"] if r["ratio"] is None else f"{r['policy']} @ {r['ratio']:.0%}"
        lines.append(f"| {name} | {r['task']} | {fmt(r['score'], '.3f')} | {fmt(r['eviction_ratio'], '.3f')} | "
                     f"{fmt(r['kv_share'], '.3f')} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = str(smollm2_dir())
    rows: List[Dict[str, Any]] = []
    for policy in args.policies:
        torch.manual_seed(0)
        rows.extend(run_policy(policy, args, model_dir, device))
    print(table(rows, args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()},
                                                  "device": device, "rows": rows}, indent=2))
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
