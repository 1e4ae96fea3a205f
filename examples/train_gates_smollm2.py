#!/usr/bin/env python
"""Train the shipped SmolLM2-135M-Instruct gates on Shakespeare (CPU), and store their eviction thresholds.

    python examples/train_gates_smollm2.py [--out runs/smollm2-gates] [--steps 200] [--ship]

1. Prepares the real model and text (examples/real_assets.py): the training plays exclude the 3 validation plays
   (where the recipe was chosen) and the 4 held-out test plays.
2. Trains the gates with ``python -m attngate_ext.train`` (the recipe below; the base model stays frozen).
3. Sets one global threshold per eviction ratio on training text (``calibrate_gate_threshold``: the ratio a cache
   measures at the end of a 1152-token window) and writes the bias shifts to ``OUT/gates/thresholds.json``.
4. ``--ship`` copies the gates into ``attngate_ext/pretrained/smollm2-135m-instruct`` (the card there is written
   by hand from the evaluation, ``examples/evaluate_smollm2.py``).

Recipe (chosen on the validation plays): ``--objective attention`` (each gate regresses the log of the largest
attention its token receives from queries outside the window, weighted by what the token adds to the layer
output), trained at the evaluation length (1152 tokens), window w = 128, 4 sinks, the default gate width (d' = 8).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import attngate_ext as ag  # noqa: E402
from attngate_ext.models.calibration import calibrate_gate_threshold  # noqa: E402
from attngate_ext.train import main as train_main  # noqa: E402
from attngate_ext.training.data import text_examples  # noqa: E402
from real_assets import shakespeare_splits, smollm2_dir  # noqa: E402

NAME = "smollm2-135m-instruct"
RATIOS = (0.25, 0.5, 0.75, 0.875)


def store_thresholds(model_dir: Path, gates_dir: Path, train_files, seq_len: int, windows: int) -> dict:
    """Calibrates one global threshold per ratio on ``windows`` training windows; writes thresholds.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    ag.load_gates(model, str(gates_dir))
    trained = [g.score.bias.detach().clone() for g in ag.gates(model)]
    examples = text_examples(tokenizer, [str(p) for p in train_files], seq_len)
    full = examples.attention_mask.sum(dim=1) == seq_len
    index = torch.nonzero(full).flatten()
    pick = index[torch.linspace(0, len(index) - 1, windows).long()]
    ids = examples.input_ids[pick]
    shifts, measured = {}, {}
    for ratio in RATIOS:
        for gate, bias in zip(ag.gates(model), trained):
            gate.score.bias.data.copy_(bias)
        measured[str(ratio)] = calibrate_gate_threshold(model, ids, ratio)
        shifts[str(ratio)] = float((ag.gates(model)[0].score.bias - trained[0])[0])
    record = {"vocab_size": int(model.config.vocab_size), "shifts": shifts, "measured_eviction": measured,
              "calibration": f"{windows} windows of {seq_len} tokens of the training plays, one global threshold"}
    (gates_dir / "thresholds.json").write_text(json.dumps(record, indent=2))
    return record


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "smollm2-gates"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=1152, help="training sequence length (the evaluation's window)")
    p.add_argument("--window", type=int, default=128, help="protect_recent w (default 128)")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--objective", default="attention", choices=["attention", "distill", "lm"])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--init-gates", help="continue from these gates (e.g. attention-trained ones, for --objective distill)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more python -m attngate_ext.train options")
    p.add_argument("--calibration-windows", type=int, default=4)
    p.add_argument("--ship", action="store_true", help="copy the result into attngate_ext/pretrained/" + NAME)
    args = p.parse_args()
    model_dir = smollm2_dir()
    train_files, _, _ = shakespeare_splits()
    out = Path(args.out)
    started = time.time()
    train_main(["--model", str(model_dir), "--text", *map(str, train_files), "--out", str(out),
                "--objective", args.objective, "--steps", str(args.steps), "--batch-size", "1",
                "--seq-len", str(args.seq_len), "--lr", str(args.lr), "--warmup", "10", "--window", str(args.window),
                "--sinks", str(args.sinks), "--save-every", "25", "--no-progress",
                *(["--resume"] if any(out.glob("checkpoints/step-*")) else []),
                *(["--init-gates", args.init_gates] if args.init_gates else []), *args.extra])
    print(f"training: {(time.time() - started) / 60:.1f} min")
    record = store_thresholds(model_dir, out / "gates", train_files, args.seq_len, args.calibration_windows)
    print("thresholds:", json.dumps(record["measured_eviction"]))
    if args.ship:
        target = ROOT / "attngate_ext" / "pretrained" / NAME
        target.mkdir(parents=True, exist_ok=True)
        for name in ("attention_gates.safetensors", "attention_gates.json", "thresholds.json"):
            shutil.copy2(out / "gates" / name, target / name)
        print(f"shipped to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
