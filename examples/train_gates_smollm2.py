#!/usr/bin/env python
"""Continual pre-training of Attention-Gates on SmolLM2-135M with Shakespeare, on CPU, then perplexity.

    python examples/train_gates_smollm2.py [--steps 600] [--out runs/smollm2-gates]

1. Prepares the real model and text (examples/real_assets.py: GGUF -> HF directory, plays split by document).
2. Trains the gates (base model frozen) with ``python -m attngate_ext.train`` at target eviction 0.5.
   The gates keep the first 4 tokens (attention sinks), as the StreamingLLM baseline does.
3. Evaluates held-out perplexity (the held-out plays, non-overlapping 512-token windows) of the ungated model, of
   the gated model at its measured eviction ratio, and of StreamingLLM (4 sinks + a recent window sized to the
   same final ratio, and again with the window that gives the same average cache size over a window), all gated
   variants on the same AttnGateCache machinery. Writes OUT/eval.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import attngate_ext as ag  # noqa: E402
from attngate_ext import remove_attention_gates  # noqa: E402
from attngate_ext.models.calibration import set_constant_gates  # noqa: E402
from attngate_ext.evaluation.perplexity import perplexity, token_windows  # noqa: E402
from attngate_ext.train import main as train_main  # noqa: E402
from real_assets import shakespeare_split, smollm2_dir  # noqa: E402

SINKS = 4


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "smollm2-gates"))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-len", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--eval-windows", type=int, default=24, help="held-out windows to evaluate")
    p.add_argument("--gate-head-dim", type=int, default=16,
                   help="gate head_dim d' (default 16: SmolLM2 has only 3 KV heads of dim 64, so the gate's own "
                        "K'/V' cache costs d'/(3*64) of the dense cache: 8%%; the default d' = 64 would cost 33%%)")
    p.add_argument("--window", type=int, default=16,
                   help="protect_recent w: an evicted token stays visible to the next w-1 queries (default 16)")
    p.add_argument("--alpha", type=float, default=100.0, help="eviction loss weight (default 100)")
    p.add_argument("--global-loss", action="store_true",
                   help="target the ratio over all heads (default: per (layer, KV head), which keeps the cache compact)")
    p.add_argument("--skip-training", action="store_true", help="evaluate the gates already in OUT/gates")
    args = p.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model_dir = smollm2_dir()
    train_files, held_out = shakespeare_split()
    out = Path(args.out)

    started = time.time()
    if not args.skip_training:
        out.mkdir(parents=True, exist_ok=True)
        config = ag.AttentionGateConfig(head_dim=args.gate_head_dim, sink_tokens=SINKS, protect_recent=args.window)
        (out / "gate_config.json").write_text(config.to_json())
        train_main(["--gate-config", str(out / "gate_config.json"),"--model", str(model_dir), "--text", *map(str, train_files), "--out", str(out),
                    "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                    "--lr", str(args.lr), "--warmup", "20", "--target-eviction", "0.5", "--save-every", "50",
                    "--alpha", str(args.alpha), *([] if args.global_loss else ["--per-head-loss"]),
                    *(["--resume"] if any(out.glob("checkpoints/step-*")) else [])])
    train_seconds = time.time() - started

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in held_out)
    windows = token_windows(tokenizer(text)["input_ids"], args.eval_len, args.eval_windows)

    def fresh_model():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()

    results = {}
    results["ungated"] = perplexity(fresh_model(), windows, progress=True)
    gated = ag.load_gates(fresh_model(), str(out / "gates"))
    results["gated"] = perplexity(gated, windows, progress=True)
    ratio = results["gated"]["eviction_ratio"]
    # StreamingLLM keeps the sinks and the last w - 1 tokens of each window at its end: match the gated ratio there.
    window = max(int(round((1.0 - ratio) * args.eval_len)) - SINKS + 1, 1)
    # decode_gating=False: a constant gate needs no K'/V' cache, so it is dropped after the prompt (the flags of a
    # single prefill are the same).
    streaming = ag.add_attention_gates(fresh_model(), ag.AttentionGateConfig(
        sink_tokens=SINKS, protect_recent=window, decode_gating=False))
    set_constant_gates(streaming, keep=False)
    results[f"streaming_llm(sinks={SINKS},window={window})"] = perplexity(streaming, windows, progress=True)
    # Equal final ratio favours StreamingLLM: it evicts nothing until its window fills, so over a window of T tokens
    # it holds more on average than a gate that evicts at a steady rate. Also compare at an equal *average* cache:
    # a window w keeps on average (w^2/2 + w(T - w)) / (T^2/2) of a dense cache's; solve for the gate's average.
    T = args.eval_len
    kept = 1.0 - ratio
    avg_window = max(int(round(T * (1.0 - (1.0 - kept) ** 0.5))) - SINKS + 1, 1)
    remove_attention_gates(streaming)
    streaming = ag.add_attention_gates(streaming, ag.AttentionGateConfig(
        sink_tokens=SINKS, protect_recent=avg_window, decode_gating=False))
    set_constant_gates(streaming, keep=False)
    results[f"streaming_llm(sinks={SINKS},window={avg_window}) equal average cache"] = perplexity(
        streaming, windows, progress=True)

    print(f"\nheld-out: {[p.name for p in held_out]}, {windows.shape[0]} windows x {args.eval_len} tokens; "
          f"training {train_seconds / 60:.1f} min")
    print(f"{'policy':<62} {'perplexity':>10} {'eviction':>9} {'KV bytes / dense':>17}")
    for name, r in results.items():
        share = f"{r['held_bytes'] / r['dense_bytes']:.3f}" if r["held_bytes"] else "1.000"
        print(f"{name:<62} {r['perplexity']:>10.2f} {r['eviction_ratio']:>9.3f} {share:>17}")
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    (out / "eval.json").write_text(json.dumps({"results": results, "held_out": [p.name for p in held_out],
                                               "eval_len": args.eval_len, "train_seconds": train_seconds,
                                               "training": report.get("final"),
                                               "retention_per_layer": report.get("retention_per_layer")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
