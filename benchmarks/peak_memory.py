"""Peak-memory section: a long prompt prefilled in chunks, dense ``DynamicCache`` vs gated ``AttnGateCache``.

A tiny random-weight Llama (CPU sized: the KV cache dominates its memory) reads a ``tokens``-long prompt in chunks of
``chunk`` tokens (one forward per chunk, as an engine's chunked prefill does; ``logits_to_keep=1``). Memory is
measured with the allocator's own accounting: ``torch.profiler`` with ``profile_memory=True`` records every
allocation and free of the CPU allocator (CUDA: ``torch.cuda.max_memory_allocated``); the peak is the highest
running total of bytes allocated during the prefill, net of what was allocated before it (weights, inputs). The
gated model's gates are random, with per-layer biases calibrated on the first chunk to evict ``eviction`` of the
tokens; the measured eviction is reported next to the peak.

Also reported: both models reading the whole prompt in one forward (no chunks), and the gated model prefilling
through ``generate(..., prefill_chunk_size=chunk)`` (transformers' chunked prefill: the way to bound a long prompt's
peak with ``generate()``), with the gated pools' free pages against the slack rule ``held // 8 + one page per (row,
head)`` per pool.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Callable, Dict, List, Tuple

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import attngate_ext
from attngate_ext import cache_kwarg, calibrate_gate_bias, randomize_gates
from benchmarks.config import Config
from benchmarks.printer import Row, without_profiler_noise

TARGET = 0.6  # gated peak / dense chunked peak at 50% eviction


@dataclasses.dataclass
class PeakConfig:
    """Model shape and prompt of the section."""

    tokens: int = 16384
    chunk: int = 2048
    eviction: float = 0.5
    layers: int = 4
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 8
    intermediate: int = 512
    vocab: int = 1024
    gate_head_dim: int = 8
    seed: int = 0


def peak_bytes(fn: Callable[[], object], device: torch.device) -> Tuple[int, object]:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated when it started; and its result."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, result
    with without_profiler_noise(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        if event.device_type() == torch._C._autograd.DeviceType.CPU:
            running += event.nbytes()
            peak = max(peak, running)
    return peak, result


def _model(cfg: PeakConfig, device: torch.device) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                         max_position_embeddings=cfg.tokens)
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config).to(device).eval()


def _prefill(model: LlamaForCausalLM, ids: torch.Tensor, cache: object, chunk: int) -> object:
    key = cache_kwarg(model)
    for start in range(0, ids.shape[1], chunk):
        model(input_ids=ids[:, start : start + chunk], use_cache=True, logits_to_keep=1, **{key: cache})
    return cache


@torch.no_grad()
def run_peak_memory(cfg: PeakConfig, device: torch.device) -> Dict[str, object]:
    """Dense one-shot, dense chunked and gated chunked peaks, with the gated cache's report."""
    model = _model(cfg, device)
    ids = torch.randint(0, cfg.vocab, (1, cfg.tokens), generator=torch.Generator().manual_seed(cfg.seed + 1))
    ids = ids.to(device)
    key = cache_kwarg(model)
    dense_once, _ = peak_bytes(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1,
                                             **{key: DynamicCache()}), device)
    dense, cache = peak_bytes(lambda: _prefill(model, ids, DynamicCache(), cfg.chunk), device)
    dense_kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    del cache
    attngate_ext.add_attention_gates(model, attngate_ext.AttentionGateConfig(head_dim=cfg.gate_head_dim))
    randomize_gates(model, seed=cfg.seed)
    calibrate_gate_bias(model, ids[:, : cfg.chunk], cfg.eviction)
    gated, cache = peak_bytes(lambda: _prefill(model, ids, attngate_ext.AttnGateCache(), cfg.chunk), device)
    report = cache.memory_report()
    slack = _slack_over_rule(cache)
    del cache
    gated_once, _ = peak_bytes(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1,
                                             **{key: attngate_ext.AttnGateCache()}), device)
    generate_cache = attngate_ext.AttnGateCache()
    gated_generate, _ = peak_bytes(lambda: model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0,
        prefill_chunk_size=cfg.chunk, **{key: generate_cache}), device)
    return {"dense_once": dense_once, "dense": dense, "dense_kv": dense_kv, "gated": gated, "gated_once": gated_once,
            "gated_generate": gated_generate, "generate_eviction": generate_cache.memory_report().eviction_ratio,
            "slack_over_rule": slack, "report": report}


def _slack_over_rule(cache: attngate_ext.AttnGateCache) -> int:
    """The most free pages any pool holds beyond the slack rule ``held // 8 + rows * heads`` (<= 0: the rule holds)."""
    worst = None
    for layer in cache.layers:
        pools = [layer.kv] + ([layer.gate_kv.pages] if layer.gate_kv is not None else [])
        for pages in pools:
            held = pages.pages_used()
            over = pages.free_page_count() - (held // 8 + pages.lengths.numel())
            worst = over if worst is None else max(worst, over)
    return worst if worst is not None else 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def peak_memory_section(run_cfg: Config) -> List[Row]:
    """The run.py section: prints the comparison, returns one Row (op ``peak_prefill``)."""
    cfg = PeakConfig(tokens=1024, chunk=256) if run_cfg.quick else PeakConfig()
    res = run_peak_memory(cfg, run_cfg.device)
    report = res["report"]
    ratio = res["gated"] / res["dense"]
    shape = f"L{cfg.layers} d{cfg.hidden} H{cfg.heads}/{cfg.kv_heads} N{cfg.tokens}/{cfg.chunk}"
    print(f"\npeak memory of a {cfg.tokens}-token prefill in {cfg.chunk}-token chunks (tiny random Llama {shape}, "
          f"float32, allocator accounting above the weights):")
    print(f"  dense DynamicCache, one forward:   {_mib(res['dense_once'])}")
    print(f"  dense DynamicCache, chunked:       {_mib(res['dense'])}  (its K/V: {_mib(res['dense_kv'])})")
    print(f"  gated AttnGateCache, one forward:  {_mib(res['gated_once'])}  "
          f"({res['gated_once'] / res['dense_once']:.3f} of dense one forward)")
    print(f"  gated AttnGateCache, chunked:      {_mib(res['gated'])}  (held {_mib(report.held_bytes)}, of "
          f"which gate K'V' {_mib(report.gate_bytes)}; free pages {_mib(report.free_page_bytes)}; measured "
          f"eviction {report.eviction_ratio:.3f})")
    print(f"  gated, generate(prefill_chunk_size={cfg.chunk}): {_mib(res['gated_generate'])}  "
          f"({res['gated_generate'] / res['dense_once']:.3f} of dense one forward; measured eviction "
          f"{res['generate_eviction']:.3f})")
    rule = "holds" if res["slack_over_rule"] <= 0 else f"EXCEEDED by {res['slack_over_rule']} pages"
    print(f"  pool slack rule (free <= held // 8 + one page per (row, head), every pool): {rule}")
    met = "met" if ratio <= TARGET else "MISSED"
    print(f"  gated / dense chunked peak: {ratio:.3f} (target <= {TARGET} at {cfg.eviction:.0%} eviction: {met})")
    extra = {k: v for k, v in res.items() if k != "report"}
    extra.update(eviction=report.eviction_ratio, held_bytes=report.held_bytes, gate_bytes=report.gate_bytes,
                 free_page_bytes=report.free_page_bytes, ratio=ratio, target=TARGET, config=dataclasses.asdict(cfg))
    return [Row(section="memory", op="peak_prefill", shape=shape, dtype="float32", device=run_cfg.device.type,
                op_us=0.0, ref_us=0.0, speedup=res["dense"] / res["gated"], bytes=res["gated"], gbps=0.0,
                copy_gbps=0.0, pct_copy=0.0, check="ok" if res["slack_over_rule"] <= 0 else "slack", extra=extra)]
