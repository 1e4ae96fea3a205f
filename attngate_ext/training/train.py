"""Train the Attention-Gates of a pre-trained model of a supported family (docs/training.md, docs/cache.md).

    python -m attngate_ext.train --model DIR --text a.txt b.txt --out runs/gates --steps 300
    python -m attngate_ext.train --model DIR --sft data.jsonl --out runs/sft --lora --steps 300
    torchrun --nproc_per_node=4 -m attngate_ext.train --model DIR --text corpus/ --out runs/gates   # data-parallel

Continual pre-training reads plain text (one document per file, see :mod:`attngate_ext.training.data` for the
packing rule); SFT reads JSONL ``{"prompt", "answer"}`` records and learns the answers only. The base model is frozen;
the gates are trained (``--lora`` adds LoRA adapters through peft). ``--objective`` picks the loss: ``lm``
(cross-entropy of the labels + the eviction loss), ``distill`` (KL to the same model with every token kept + the
eviction loss) or ``attention`` (each gate regresses the future attention its tokens receive; the eviction ratio
is then a threshold). Checkpoints under ``OUT/checkpoints/step-N`` hold the gates (``save_gates`` format), the
LoRA adapter, and the optimizer/scheduler state; ``--resume`` continues from the latest one. ``OUT/report.json``
gets the history and the measured retention per layer and head. The model directory is read locally only.
Under torchrun every process trains on its slice of each global batch and gradients are averaged (gloo on CPU,
NCCL on GPU); process 0 writes the files. An ``--out`` that holds a run's results is refused unless ``--resume``
or ``--overwrite`` (see :mod:`attngate_ext.training.out_dir`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from ..gate.config import AttentionGateConfig
from ..models.calibration import calibrate_gate_threshold, randomize_gates
from ..models.gate_files import load_gates, save_gates
from ..models.model import add_attention_gates, gate_config, gates, update_gate_config
from . import utils
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, trainable_parameters
from .data import Examples, sft_examples, text_examples
from .distributed import (World, average_gradients, barrier, broadcast_parameters, init_world, mean_over_world,
                          shutdown)
from .losses import eviction_target
from .objectives import OBJECTIVES, STEPS, ObjectiveConfig, init_biases_to_mean_scores
from .out_dir import clean_up_failed_run, prepare_out_dir
LORA_TARGETS = r".*\.self_attn\.attention\.(q_proj|k_proj|v_proj|o_proj)"  # the model's, not the gates' projections
LOGGED = ("loss", "task_loss", "eviction_loss", "retention", "target")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m attngate_ext.train", description=__doc__.split("\n\n")[0],
                                formatter_class=utils.HelpWithDefaults)
    p.add_argument("--model", required=True, help="local Hugging Face model directory (Llama, Mistral, Qwen2/3, OLMo-2, Phi-3, Gemma 2/3)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--text", nargs="+", help="plain-text files or directories of *.txt (continual pre-training)")
    data.add_argument("--sft", help="JSONL file of {prompt, answer} records (supervised fine-tuning)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, final gates, report.json)")
    p.add_argument("--objective", choices=OBJECTIVES, default="lm",
                   help="lm: label cross-entropy + eviction loss (straight-through flags); distill: KL to the same "
                        "model with every token kept + eviction loss; attention: regress each gate on the future "
                        "attention its tokens receive (one no-grad forward per step, no backward through the model), "
                        "then set the threshold for --target-eviction (default lm)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per process and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=256,
                   help="tokens per training sequence; train at the context length the gates will see")
    p.add_argument("--max-documents", type=int, default=None, help="use only the first N text documents")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--lora-lr", type=float, default=1e-4, help="learning rate of the LoRA adapters")
    p.add_argument("--warmup", type=int, default=20, help="linear warm-up steps, then cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--target-eviction", type=float, default=0.5, help="target eviction ratio (default 0.5)")
    p.add_argument("--target-ramp", type=int, default=0,
                   help="raise the eviction target linearly from 0 to --target-eviction over the first N steps "
                        "(default 0: the full target from the start)")
    p.add_argument("--alpha", type=float, default=10.0, help="weight of the eviction loss (default 10)")
    p.add_argument("--per-layer-loss", action="store_true", help="target the ratio in every layer, not globally")
    p.add_argument("--per-head-loss", action="store_true",
                   help="target the ratio in every (layer, KV head) instead of letting heads differ")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of --objective distill")
    p.add_argument("--min-future", type=int, default=128,
                   help="--objective attention: train only on tokens seen by at least N queries outside the window "
                        "(default 128)")
    p.add_argument("--gate-config", help="JSON file with AttentionGateConfig fields (default: the defaults)")
    p.add_argument("--window", type=int, default=None,
                   help="protect_recent w, the window of recent tokens every query sees whatever the flags; train "
                        "at the w the gates will be used with (overrides --gate-config / --init-gates)")
    p.add_argument("--window-choices", nargs="+", type=int, default=None,
                   help="train at a window w drawn per step from these (seeded by the step, so --resume repeats the "
                        "draws): gates that serve several windows, e.g. a smaller w for a smaller byte budget; the "
                        "saved gates get --window (or the first choice)")
    p.add_argument("--sinks", type=int, default=None, help="sink_tokens, always kept (overrides the gate config)")
    p.add_argument("--gate-attention-window", type=int, default=None,
                   help="attention_window of the gates' own attention (0: every earlier token; W > 0: the last W, "
                        "so their K'/V' cache is a W-slot ring; overrides the gate config)")
    p.add_argument("--gate-head-dim", type=int, default=None,
                   help="the gate's head_dim d' (default: at most ~3%% of the dense cache, never below 8)")
    p.add_argument("--init-gates", help="start from gates saved by save_gates instead of fresh ones")
    p.add_argument("--init-spread", type=float, default=1.0,
                   help="fresh gates: std of the initial gate logits around the +3 bias (default 1). With W_g near "
                        "zero every token has the same logit, so lowering the bias would evict all tokens at once; "
                        "a spread orders them, and retention falls smoothly. 0 keeps the near-zero W_g init")
    p.add_argument("--lora", action="store_true", help="also train LoRA adapters on q/k/v/o (needs peft)")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA adapters")
    p.add_argument("--dtype", choices=list(utils.DTYPES), default="float32", help="dtype of the model and the gates")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to train on (default: cuda when available, else cpu)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out (an error when it has none)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run's results: delete its checkpoints, gates, lora and "
                        "report.json first")
    p.add_argument("--stop-after", type=int, default=None,
                   help="leave after N steps of this run (checkpointed; continue with --resume), e.g. for time limits")
    p.add_argument("--seed", type=int, default=0, help="random seed (data order, fresh gates)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.target_eviction <= 1.0:
        p.error("--target-eviction must lie in [0, 1]")
    if args.window is not None and args.window < 1:
        p.error("--window must be >= 1")
    if args.window_choices is not None and min(args.window_choices) < 1:
        p.error("--window-choices must be >= 1")
    if args.objective != "lm" and args.lora:
        p.error("--lora trains the model itself: use it with --objective lm")
    utils.require(p, args, [
        ("lr", utils.positive, "a finite number > 0"),
        ("lora_lr", utils.positive, "a finite number > 0"),
        ("weight_decay", utils.non_negative, "a finite number >= 0"),
        ("alpha", utils.non_negative, "a finite number >= 0"),
        ("init_spread", utils.non_negative, "a finite number >= 0"),
        ("temperature", utils.positive, "a finite number > 0"),
        ("warmup", lambda x: x >= 0, ">= 0"),
        ("target_ramp", lambda x: x >= 0, ">= 0"),
        ("min_future", lambda x: x >= 0, ">= 0"),
        ("sinks", lambda x: x >= 0, ">= 0"),
        ("gate_attention_window", lambda x: x >= 0, ">= 0"),
        ("gate_head_dim", utils.at_least_one, ">= 1"),
        ("lora_rank", utils.at_least_one, ">= 1"),
        ("keep_checkpoints", utils.at_least_one, ">= 1"),
        ("stop_after", utils.at_least_one, ">= 1"),
        ("max_documents", utils.at_least_one, ">= 1"),
    ])
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other")
    return args


def _config_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    changes = {}
    if args.window is not None:
        changes["protect_recent"] = args.window
    if args.sinks is not None:
        changes["sink_tokens"] = args.sinks
    if getattr(args, "gate_attention_window", None) is not None:
        changes["attention_window"] = args.gate_attention_window
    return changes


def objective_config(args: argparse.Namespace) -> ObjectiveConfig:
    """The objectives' settings from the command line."""
    return ObjectiveConfig(alpha=args.alpha, per_layer=args.per_layer_loss, per_head=args.per_head_loss,
                           temperature=args.temperature, min_future=args.min_future, grad_accum=args.grad_accum)


def load_model(args: argparse.Namespace):
    """The frozen base model (local files only) with gates (fresh or from --init-gates) and its tokenizer."""
    model, tokenizer = utils.load_local_model(args.model, args.dtype, args.device)
    model.requires_grad_(False)
    if args.init_gates:
        load_gates(model, args.init_gates)
        if _config_overrides(args):
            update_gate_config(model, **_config_overrides(args))
    else:
        config = AttentionGateConfig()
        if args.gate_config:
            config = AttentionGateConfig.from_dict(utils.read_json_file(args.gate_config, "--gate-config"))
        config = dataclasses.replace(config, **_config_overrides(args))
        if args.gate_head_dim is not None:
            config = dataclasses.replace(config, head_dim=args.gate_head_dim)
        add_attention_gates(model, config)
        if args.init_spread > 0:
            randomize_gates(model, seed=args.seed, spread=args.init_spread)
            for gate in gates(model):
                with torch.no_grad():
                    gate.score.bias.fill_(config.init_bias)
    return model, tokenizer


def add_lora(model, rank: int):
    """Injects LoRA adapters into the model's attention projections (in place) and returns the peft wrapper."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is installed by the bootstrap
        raise ImportError("--lora needs peft: pip install peft") from exc
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS,
                                                  lora_dropout=0.0))
    return peft_model


def window_for_step(choices: Sequence[int], seed: int, step: int) -> int:
    """The window of training step ``step`` under ``--window-choices`` (a pure function of the seed and step)."""
    return random.Random(seed * 1_000_003 + step).choice(list(choices))


def lr_lambda(warmup: int, total: int):
    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return schedule


def build_examples(args: argparse.Namespace, tokenizer) -> Examples:
    if args.text:
        return text_examples(tokenizer, args.text, args.seq_len, args.max_documents)
    return sft_examples(tokenizer, args.sft, args.seq_len)


def shard(batches: Iterator[dict], world: World) -> Iterator[dict]:
    """This process's rows of each global batch (process r takes rows ``r*b .. (r+1)*b - 1``)."""
    for batch in batches:
        size = batch["input_ids"].shape[0] // world.size
        yield {k: v[world.rank * size : (world.rank + 1) * size] for k, v in batch.items()}


def set_threshold(model, examples: Examples, args: argparse.Namespace) -> Optional[float]:
    """--objective attention: one global threshold (a shift of every gate bias) for --target-eviction on up to 4
    training sequences, as a cache would measure it. Returns the measured eviction."""
    if args.objective != "attention":
        return None
    take = min(len(examples), 4)
    ids = examples.input_ids[:take].to(args.device)
    mask = examples.attention_mask[:take].to(args.device)
    return calibrate_gate_threshold(model, ids, args.target_eviction, mask)


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Runs the training described by ``args`` and returns the final report (also written to OUT/report.json)."""
    world = init_world(args.device)
    args.device = world.device
    try:
        out = Path(args.out)
        # Every process checks --out (so that all refuse together); process 0 alone deletes and creates.
        created = prepare_out_dir(out, args.resume, getattr(args, "overwrite", False), latest_checkpoint,
                                  write=world.main)
        barrier(world)
        try:
            report = _train(args, world, out)
        except BaseException:
            done = clean_up_failed_run(out, created, latest_checkpoint) if world.main else None
            if done:
                print(done, file=sys.stderr)
            raise
        if world.main:
            written = [out / name for name in ("gates", "lora", "report.json", "checkpoints") if (out / name).exists()]
            print("outputs: " + ", ".join(str(p) for p in written), flush=True)
        return report
    finally:
        shutdown(world)


def _train(args: argparse.Namespace, world: World, out: Path) -> Dict[str, Any]:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model, tokenizer = load_model(args)
    peft_model = add_lora(model, args.lora_rank) if args.lora else None
    for gate in gates(model):
        gate.requires_grad_(True)  # peft freezes everything it did not add
    model.train()
    gate_params = [p for gate in gates(model) for p in gate.parameters()]
    gate_ids = {id(p) for p in gate_params}
    other = [p for p in trainable_parameters(model).values() if id(p) not in gate_ids]
    groups = [{"params": gate_params, "lr": args.lr}] + ([{"params": other, "lr": args.lora_lr}] if other else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.steps))
    broadcast_parameters(trainable_parameters(model).values(), world)
    step = 0
    if args.resume and (ckpt := latest_checkpoint(out)) is not None:
        step = load_checkpoint(ckpt, model, optimizer, scheduler)
        if world.main:
            print(f"resumed from {ckpt} at step {step}")
    examples = build_examples(args, tokenizer)
    global_batch = args.batch_size * world.size
    batches = shard(examples.batches(global_batch, args.seed, start_step=step * args.grad_accum), world)
    objective = objective_config(args)
    if args.objective == "attention" and step == 0 and not args.init_gates:
        first = next(shard(examples.batches(global_batch, args.seed), world))
        init_biases_to_mean_scores(model, {k: v.to(args.device) for k, v in first.items()}, objective, world)
    step_fn = STEPS[args.objective]
    history: List[Dict[str, Any]] = []
    started = time.time()
    progress = _progress(args, initial=step) if world.main else None
    logs: List[Dict[str, Any]] = []
    stop = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
    while step < stop:
        optimizer.zero_grad(set_to_none=True)
        target = eviction_target(step, args.target_eviction, args.target_ramp)
        window = window_for_step(args.window_choices, args.seed, step) if args.window_choices else None
        if window is not None:
            update_gate_config(model, protect_recent=window)
        logs = []
        for _ in range(args.grad_accum):
            batch = {k: v.to(args.device) for k, v in next(batches).items()}
            logs.append(step_fn(model, batch, target, objective, world))
        trainable = list(trainable_parameters(model).values())
        average_gradients(trainable, world)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        record = {"step": step, **{k: mean_over_world(sum(l[k] for l in logs) / len(logs), world)
                                   for k in LOGGED if k in logs[0]}}
        if window is not None:
            record["window"] = window
        history.append(record)
        _show(progress, record, args, world)
        if step % args.save_every == 0 or step == stop:
            if world.main:
                save_checkpoint(out, step, model, peft_model, optimizer, scheduler, args.keep_checkpoints)
            barrier(world)
    if progress is not None:
        progress.close()
    if args.window_choices:
        update_gate_config(model, protect_recent=args.window or args.window_choices[0])
    last = logs[-1] if logs else {}
    report = {
        "steps": step,
        "processes": world.size,
        "examples": len(examples),
        "seconds": round(time.time() - started, 1),
        "target_eviction": args.target_eviction,
        "gate_config": gate_config(model).to_dict(),
        "final": history[-1] if history else None,
        "retention_per_layer": last.get("retention_per_layer"),
        "retention_per_head": last.get("retention_per_head"),
        "history": history,
        "args": {k: v for k, v in vars(args).items()},
    }
    if world.main:
        if step >= args.steps:
            model.eval()
            report["threshold_eviction"] = set_threshold(model, examples, args)
        save_gates(model, str(out / "gates"))
        if peft_model is not None:
            peft_model.save_pretrained(str(out / "lora"))
        (out / "report.json").write_text(json.dumps(report, indent=2))
    barrier(world)
    return report


def _progress(args: argparse.Namespace, initial: int):
    if args.no_progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=args.steps, initial=initial, desc="gates", dynamic_ncols=True)


def _show(progress, record: Dict[str, Any], args: argparse.Namespace, world: World) -> None:
    if not world.main:
        return
    text = {"loss": f"{record['loss']:.3f}", "task": f"{record['task_loss']:.3f}"}
    if "retention" in record:
        text["ret"] = f"{record['retention']:.3f}"
    if progress is not None:
        progress.set_postfix(text)
        progress.update(1)
    elif record["step"] % 10 == 0 or record["step"] == args.steps:
        print(f"step {record['step']}/{args.steps} " + " ".join(f"{k} {v}" for k, v in text.items()), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
