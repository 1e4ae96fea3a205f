#!/usr/bin/env python
"""Train the shipped SmolLM2-135M-Instruct gates on Shakespeare (CPU), and store their eviction thresholds.

    python examples/train_gates_smollm2.py [--out runs/smollm2-gates] [--ship]

1. Prepares the real model and text (examples/real_assets.py): the training plays exclude the 3 validation plays
   (where the recipe was chosen) and the 4 held-out test plays.
2. Stage 1, ``--objective attention`` (80 steps, lr 3e-3, w = 128, 4 sinks, default gate width d' = 8): each gate
   regresses the log of the largest attention its token receives from queries outside the window, weighted by what
   the token adds to the layer output. One no-grad forward per step.
3. Stage 2, ``--objective distill`` from the stage-1 gates (60 steps, lr 1e-3, eviction target 0.7, alpha 50): KL
   to the same model with every token kept, through the straight-through flags.
4. Stage 3, the same distillation at the window the gates are used with (w = 256, chosen on the validation plays;
   60 steps, lr 5e-4).
5. Sets one global threshold per eviction ratio on training text (``calibrate_gate_threshold``: the ratio a cache
   measures at the end of a 1152-token window); writes the bias shifts to ``OUT/gates/thresholds.json``.
6. ``--ship`` copies the gates into ``attngate_ext/pretrained/smollm2-135m-instruct`` (the card there is written
   by hand from the evaluation, ``examples/evaluate_smollm2.py``).

Every stage trains at the evaluation length (1152 tokens, batch 1). On the 2-core CPU machine stage 1 took 13,
stage 2 25 (one thread each) and stage 3 9 minutes (two threads).
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
        reached = ag.calibrate_gate_threshold(model, ids, ratio)
        if abs(reached - ratio) > 0.02:  # the sinks and the window are always held: a ratio beyond them is unreachable
            print(f"ratio {ratio}: not reachable with this window (measured {reached:.3f}), not stored")
            continue
        measured[str(ratio)] = reached
        shifts[str(ratio)] = float((ag.gates(model)[0].score.bias - trained[0]).detach()[0])
    record = {"vocab_size": int(model.config.vocab_size), "shifts": shifts, "measured_eviction": measured,
              "calibration": f"{windows} windows of {seq_len} tokens of the training plays, one global threshold"}
    (gates_dir / "thresholds.json").write_text(json.dumps(record, indent=2))
    return record


def _train(out: Path, model_dir: Path, train_files, common: list, stage: list) -> None:
    train_main(["--model", str(model_dir), "--text", *map(str, train_files), "--out", str(out), *common, *stage,
                "--save-every", "20", "--no-progress", *(["--resume"] if any(out.glob("checkpoints/step-*")) else [])])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "smollm2-gates"))
    p.add_argument("--attention-steps", type=int, default=80, help="stage 1 steps (--objective attention)")
    p.add_argument("--distill-steps", type=int, default=60, help="stage 2 steps (--objective distill)")
    p.add_argument("--window-steps", type=int, default=60, help="stage 3 steps (distill at --window)")
    p.add_argument("--seq-len", type=int, default=1152, help="training sequence length (the evaluation's window)")
    p.add_argument("--train-window", type=int, default=128, help="protect_recent w of stages 1 and 2")
    p.add_argument("--window", type=int, default=256, help="protect_recent w the shipped gates are used with")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--calibration-windows", type=int, default=4)
    p.add_argument("--ship", action="store_true", help="copy the result into attngate_ext/pretrained/" + NAME)
    args = p.parse_args()
    model_dir = smollm2_dir()
    train_files, _, _ = shakespeare_splits()
    out = Path(args.out)
    common = ["--batch-size", "1", "--seq-len", str(args.seq_len), "--warmup", "5", "--sinks", str(args.sinks),
              "--window", str(args.train_window)]
    started = time.time()
    _train(out / "attention", model_dir, train_files, common,
           ["--objective", "attention", "--steps", str(args.attention_steps), "--lr", "3e-3", "--alpha", "10",
            "--target-eviction", "0.5"])
    _train(out / "distill", model_dir, train_files, common,
           ["--objective", "distill", "--steps", str(args.distill_steps), "--lr", "1e-3", "--alpha", "50",
            "--target-eviction", "0.7", "--init-gates", str(out / "attention" / "gates")])
    _train(out / "window", model_dir, train_files, common + ["--window", str(args.window)],
           ["--objective", "distill", "--steps", str(args.window_steps), "--lr", "5e-4", "--alpha", "50",
            "--target-eviction", "0.7", "--init-gates", str(out / "distill" / "gates")])
    print(f"training: {(time.time() - started) / 60:.1f} min")

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    ag.load_gates(model, str(out / "window" / "gates"))
    ag.update_gate_config(model, protect_recent=args.window)
    gates_dir = out / "gates"
    ag.save_gates(model, str(gates_dir))
    record = store_thresholds(model_dir, gates_dir, train_files, args.seq_len, args.calibration_windows)
    print("thresholds:", json.dumps(record["measured_eviction"]))
    if args.ship:
        target = ROOT / "attngate_ext" / "pretrained" / NAME
        target.mkdir(parents=True, exist_ok=True)
        for name in ("attention_gates.safetensors", "attention_gates.json", "thresholds.json"):
            shutil.copy2(gates_dir / name, target / name)
        print(f"shipped to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
