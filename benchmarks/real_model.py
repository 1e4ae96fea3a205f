"""Real-model section (``run.py --real``): SmolLM2-135M-Instruct on held-out Shakespeare, dense vs gated.

The model and text come from ``examples/real_assets.py`` (converted once into ``~/.cache/attngate_ext``; the
section says so and is skipped when they are missing). Everything runs in float32 on the run's device.

* **memory**: the trained gates (``attngate_ext.pretrained_gates`` when the package ships gates for this model,
  else random gates, said in the output) on a batch of 4 held-out prompts of different lengths, left-padded, then
  ``decode`` greedy steps. Reported: the K/V bytes held against ``(1 - measured eviction) + 3%`` of a dense cache of
  the same (valid) tokens, plus the gates' own K'/V'; pages held against pages needed.
* **half precision** (``benchmarks/half_precision.py``): fresh gates (keep everything) in bfloat16 over
  ``half_prompts`` held-out windows: the rate at which the greedy token of teacher-forced decoding disagrees with the
  float32 model's, plain bf16 model against gated bf16 model, and the logits' differences
  and of the gated bf16 model against the float32 model, and greedy tokens against float32's.
* **speed**: one long held-out prompt (``long_prompt`` tokens), prefill and ``decode`` greedy steps, dense
  (``DynamicCache``) then gated with the gates' biases calibrated to evict ``eviction`` of a training play: prefill
  time and decode tokens/s, measured in the same run.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from transformers import AutoModelForCausalLM, DynamicCache

import attngate_ext
from attngate_ext import cache_kwarg, calibrate_gate_bias, randomize_gates
from benchmarks.config import Config
from benchmarks.half_precision import bf16_agreement, describe
from benchmarks.printer import Row
from benchmarks.timing import Stopwatch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
KV_SLACK = 0.03  # held K/V <= (1 - eviction) + 3% of dense, plus the gates' K'/V'
PREFILL_TARGET = 1.3  # gated prefill time <= 1.3x dense
DECODE_TARGET = 1.2  # gated decode tokens/s >= 1.2x dense
MODEL_NAME = "smollm2-135m-instruct"


@dataclasses.dataclass
class RealConfig:
    """Prompt lengths and steps of the section."""

    batch_lengths: tuple = (1024, 896, 704, 512)
    long_prompt: int = 8064
    decode: int = 64
    eviction: float = 0.5
    warmup: int = 64
    half_prompt: int = 256
    half_steps: int = 64
    half_prompts: int = 16


def _assets():
    """(model directory, training plays, held-out plays), or None when the assets are not prepared."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import real_assets
    finally:
        sys.path.pop(0)
    model_dir = real_assets.CACHE / "smollm2-135m-instruct"
    if not (model_dir / "config.json").is_file():
        return None
    train, held_out = real_assets.shakespeare_split()[:2]
    return model_dir, train, held_out


def _tokens(tokenizer, paths: List[Path], count: int) -> torch.Tensor:
    ids: List[int] = []
    for path in paths:
        ids += tokenizer(path.read_text(encoding="utf-8"))["input_ids"]
        if len(ids) >= count:
            break
    return torch.tensor(ids[:count])


def _gates(model) -> str:
    """Loads the shipped trained gates when there are some for this model; else adds random gates."""
    loader = getattr(attngate_ext, "pretrained_gates", None)
    if loader is not None:
        try:
            attngate_ext.load_gates(model, loader(MODEL_NAME))
            return f"trained gates ({MODEL_NAME})"
        except (FileNotFoundError, KeyError, ValueError):
            pass
    attngate_ext.add_attention_gates(model, attngate_ext.AttentionGateConfig(head_dim=8, sink_tokens=4))
    randomize_gates(model, seed=0)
    return "random gates (no trained gates shipped for this model)"


def _timed_generate(model, ids: torch.Tensor, mask: Optional[torch.Tensor], cache, steps: int):
    """Prefill then ``steps`` greedy steps; (prefill s, decode s)."""
    kwargs = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
    with Stopwatch(ids.device) as prefill:
        out = model(input_ids=ids, attention_mask=mask, **kwargs)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    with Stopwatch(ids.device) as decode:
        for _ in range(steps):
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            token = model(input_ids=token, attention_mask=mask, **kwargs).logits[:, -1].argmax(-1, keepdim=True)
    return prefill.seconds, decode.seconds


@torch.no_grad()
def run_real(cfg: RealConfig, device: torch.device) -> Optional[Dict[str, object]]:
    """The section's measurements, or None when the assets are missing."""
    assets = _assets()
    if assets is None:
        return None
    model_dir, train, held_out = assets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    long_ids = _tokens(tokenizer, held_out, cfg.long_prompt).unsqueeze(0).to(device)
    calibration = _tokens(tokenizer, train[:1], 2048).unsqueeze(0).to(device)
    result: Dict[str, object] = {"config": dataclasses.asdict(cfg)}
    windows = cfg.half_prompt + cfg.half_steps - 1
    half_ids = _tokens(tokenizer, held_out, cfg.half_prompts * windows).view(cfg.half_prompts, windows)
    result["half"] = bf16_agreement(model_dir, half_ids, cfg.half_prompt, device)

    # Speed: dense, then gated at the asked eviction, same prompt, warm-up first.
    _timed_generate(model, long_ids[:, : cfg.warmup], None, DynamicCache(), 4)
    dense_prefill, dense_decode = _timed_generate(model, long_ids, None, DynamicCache(), cfg.decode)
    result["gates"] = _gates(model)
    calibrate_gate_bias(model, calibration, cfg.eviction)
    _timed_generate(model, long_ids[:, : cfg.warmup], None, attngate_ext.AttnGateCache(), 4)
    cache = attngate_ext.AttnGateCache()
    gated_prefill, gated_decode = _timed_generate(model, long_ids, None, cache, cfg.decode)
    report = cache.memory_report()
    result["speed"] = {
        "dense_prefill_s": dense_prefill, "gated_prefill_s": gated_prefill,
        "prefill_ratio": gated_prefill / dense_prefill,
        "dense_decode_tok_s": cfg.decode / dense_decode, "gated_decode_tok_s": cfg.decode / gated_decode,
        "decode_speedup": dense_decode / gated_decode, "eviction": report.eviction_ratio,
    }
    del cache

    # Memory: a left-padded batch of held-out prompts of different lengths, with the gates as trained.
    attngate_ext.remove_attention_gates(model)
    _gates(model)
    text = _tokens(tokenizer, held_out[1:], sum(cfg.batch_lengths))
    longest = max(cfg.batch_lengths)
    ids = torch.zeros(len(cfg.batch_lengths), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    start = 0
    for row, n in enumerate(cfg.batch_lengths):
        ids[row, longest - n :] = text[start : start + n]
        mask[row, longest - n :] = 1
        start += n
    cache = attngate_ext.AttnGateCache()
    _timed_generate(model, ids.to(device), mask.to(device), cache, cfg.decode)
    report = cache.memory_report()
    dense_valid = report.dense_valid_bytes
    allowed = (1 - report.eviction_ratio + KV_SLACK) * dense_valid
    result["memory"] = {
        "eviction": report.eviction_ratio, "kv_bytes": report.kv_bytes, "gate_bytes": report.gate_bytes,
        "free_page_bytes": report.free_page_bytes, "dense_valid_bytes": dense_valid,
        "dense_bytes": report.dense_bytes, "kv_share": report.kv_bytes / dense_valid,
        "gate_share": report.gate_bytes / dense_valid, "target_share": allowed / dense_valid,
        "target_met": report.kv_bytes <= allowed, "pages_held": report.pages_held,
        "pages_needed": report.pages_needed,
        "row_heads": model.config.num_hidden_layers * len(cfg.batch_lengths) * model.config.num_key_value_heads,
        "retention_per_layer": report.retention_per_layer,
    }
    return result


def real_model_section(run_cfg: Config) -> List[Row]:
    """The run.py section (only with ``--real``): prints both parts, returns two Rows."""
    cfg = RealConfig(batch_lengths=(128, 96, 80, 64), long_prompt=512, decode=8, warmup=16, half_prompt=64,
                     half_steps=8, half_prompts=2) if run_cfg.quick else RealConfig()
    res = run_real(cfg, run_cfg.device)
    if res is None:
        print("\nreal model: SmolLM2 assets not prepared; run `python examples/real_assets.py` first (skipped)")
        return []
    speed, mem, half = res["speed"], res["memory"], res["half"]
    print(f"\nreal model: SmolLM2-135M-Instruct, float32, {res['gates']}")
    print(f"  half precision, fresh gates (keep all), after {cfg.half_prompt}-token prompts:")
    print(describe(half))
    print(f"  speed, {cfg.long_prompt}-token held-out prompt + {cfg.decode} greedy steps, gated at "
          f"{speed['eviction']:.1%} measured eviction:")
    print(f"    prefill: dense {speed['dense_prefill_s']:.2f} s, gated {speed['gated_prefill_s']:.2f} s -> "
          f"{speed['prefill_ratio']:.2f}x (target <= {PREFILL_TARGET}x: "
          f"{'met' if speed['prefill_ratio'] <= PREFILL_TARGET else 'MISSED'})")
    print(f"    decode: dense {speed['dense_decode_tok_s']:.2f} tok/s, gated {speed['gated_decode_tok_s']:.2f} tok/s "
          f"-> {speed['decode_speedup']:.2f}x (target >= {DECODE_TARGET}x: "
          f"{'met' if speed['decode_speedup'] >= DECODE_TARGET else 'MISSED'})")
    print(f"  memory, batch {len(cfg.batch_lengths)} left-padded held-out prompts {list(cfg.batch_lengths)} + "
          f"{cfg.decode} steps, measured eviction {mem['eviction']:.3f}:")
    print(f"    K/V held {mem['kv_share']:.3f} of dense (valid tokens), target (1 - eviction) + {KV_SLACK} = "
          f"{mem['target_share']:.3f}: {'met' if mem['target_met'] else 'MISSED'}; gates' K'V' "
          f"+{mem['gate_share']:.3f}; free pages {mem['free_page_bytes'] / 2**20:.1f} MiB")
    print(f"    pages held {mem['pages_held']}, needed {mem['pages_needed']} (+ at most one per (layer, row, head) "
          f"= {mem['row_heads']})")
    shape = f"SmolLM2 N{cfg.long_prompt}+{cfg.decode}"
    rows = [Row(section="real", op="smollm2_speed", shape=shape, dtype="float32", device=run_cfg.device.type,
                op_us=speed["gated_prefill_s"] * 1e6, ref_us=speed["dense_prefill_s"] * 1e6,
                speedup=speed["decode_speedup"], bytes=0, gbps=0.0, copy_gbps=0.0, pct_copy=0.0, check="ok",
                extra=speed),
            Row(section="real", op="smollm2_half",
                shape=f"SmolLM2 {cfg.half_prompts}x(N{cfg.half_prompt}+{cfg.half_steps})",
                dtype="bfloat16", device=run_cfg.device.type, op_us=0.0, ref_us=0.0, speedup=0.0, bytes=0, gbps=0.0,
                copy_gbps=0.0, pct_copy=0.0, check="ok", extra=half),
            Row(section="real", op="smollm2_memory", shape=f"SmolLM2 B{len(cfg.batch_lengths)}", dtype="float32",
                device=run_cfg.device.type, op_us=0.0, ref_us=0.0, speedup=0.0, bytes=mem["kv_bytes"], gbps=0.0,
                copy_gbps=0.0, pct_copy=0.0, check="ok", extra=mem)]
    return rows
