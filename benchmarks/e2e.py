"""End-to-end section: prefill + greedy decode of a random-weight Llama-style model, dense HF vs gated.

Modes, all on the same model weights and the same prompt:

* ``dense``: the unmodified ``LlamaForCausalLM`` (SDPA) with a ``transformers.DynamicCache``;
* ``gated@r``: the same model after :func:`attngate_ext.add_attention_gates`, with an
  :class:`attngate_ext.AttnGateCache`; the gates get random scoring weights (:func:`randomize_gates`) and biases
  calibrated (:func:`calibrate_gate_bias`) on the prompt to evict a fraction ``r`` of its tokens (the batch repeats
  one prompt row, see :func:`make_prompt`).

Each mode: one short untimed warm-up (fresh cache), then one forward over the prompt with a fresh cache (prefill)
and ``decode`` single-token forwards feeding back the argmax token (a plain loop; ``generate()``'s own overhead would
dominate a tiny model), ``repeats`` times with a fresh cache; the times reported are the medians. Timed with
:class:`benchmarks.timing.Stopwatch` (wall time, the GPU synchronised around each timed region).

KV bytes: dense = the key/value tensors of the DynamicCache; gated = ``memory_report().kv_bytes`` (the pages held by
some (row, head) and the window ring), with the gates' own K'/V' (``gate_bytes``) and the pool's free pages in their
own columns. The target reported for the gated modes is ``KV bytes <= (1 - measured eviction) + 0.03`` of dense
(after decode); it is reported, never asserted.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
from typing import Callable, Dict, List, Optional, Tuple

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import attngate_ext
from attngate_ext import cache_kwarg, calibrate_gate_bias, randomize_gates
from benchmarks.config import Config
from benchmarks.printer import Column, Row, Table
from benchmarks.timing import Stopwatch

EVICTIONS = (0.0, 0.5, 0.75)
KV_SLACK = 0.03  # target: gated KV bytes <= (1 - eviction) + KV_SLACK of the dense KV bytes (gates' K'/V' apart)
EVICTION_TOL = 0.1  # a gated row's check fails when its measured eviction is further than this from the asked one

# Model and run sizes: "cpu" / "cuda" defaults, "quick" (any device) for a smoke run of a few seconds.
PRESETS: Dict[str, Dict[str, int]] = {
    "cpu": dict(hidden=256, layers=4, heads=8, kv_heads=8, intermediate=512, vocab=1024,
                batch=1, prefill=1024, decode=128, gate_head_dim=8),
    "cuda": dict(hidden=2048, layers=16, heads=16, kv_heads=16, intermediate=5632, vocab=32000,  # ~1.1B, Llama-2 MHA
                 batch=16, prefill=4096, decode=128, gate_head_dim=64),
    "quick": dict(hidden=128, layers=2, heads=4, kv_heads=4, intermediate=256, vocab=256,
                  batch=1, prefill=256, decode=16, gate_head_dim=4),
}


@dataclasses.dataclass
class E2EConfig:
    """Model shape, batch, lengths and gate settings of the end-to-end section."""

    device: torch.device
    dtype: torch.dtype
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    prefill: int  # prompt tokens per row
    decode: int  # single-token forwards after the prompt
    gate_head_dim: int  # d' of the gates: their K'/V' cache costs kv_heads' * d' / (kv_heads * head_dim) of dense
    prefill_chunk: int = 1024  # gated prefill in chunks of this many tokens (bounds the masks)
    warmup_prefill: int = 128  # untimed warm-up per mode: a prompt of this many tokens...
    warmup_decode: int = 4  # ...and this many decode steps
    repeats: int = 3  # timed prefill + decode runs per mode (fresh cache each); times are their medians
    evictions: Tuple[float, ...] = EVICTIONS
    seed: int = 0

    def __post_init__(self) -> None:
        """Raises ValueError on sizes the run cannot use."""
        for name in ("batch", "prefill", "decode"):
            if getattr(self, name) < 1:
                raise ValueError(f"e2e {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"e2e: heads ({self.heads}) must divide hidden ({self.hidden}) and be a multiple of "
                             f"kv_heads ({self.kv_heads})")

    @property
    def head_dim(self) -> int:
        """D, the model's head dimension."""
        return self.hidden // self.heads

    def gate_config(self) -> attngate_ext.AttentionGateConfig:
        """The gates' settings: head_dim d' and prefill_chunk from this config, the rest AttentionGateConfig's."""
        return attngate_ext.AttentionGateConfig(head_dim=self.gate_head_dim, prefill_chunk=self.prefill_chunk)

    def gate_cost(self) -> float:
        """The gates' K'/V' cache as a fraction of the dense KV cache: h'_kv * d' / (H * D)."""
        return self.gate_config().num_kv_heads * self.gate_head_dim / (self.kv_heads * self.head_dim)

    def shape(self) -> str:
        """The shape cell of the rows: layers, hidden, heads / KV heads, head dim, batch, prompt + decode."""
        return (f"L{self.layers} d{self.hidden} H{self.heads}/{self.kv_heads} D{self.head_dim} "
                f"B{self.batch} N{self.prefill}+{self.decode}")

    def to_json(self) -> Dict[str, object]:
        """This config (device and dtype as strings) and the gate config, for the JSON file."""
        out = {k: str(v) if isinstance(v, (torch.device, torch.dtype)) else v
               for k, v in dataclasses.asdict(self).items()}
        out["gate"] = self.gate_config().to_dict()
        return out


def e2e_config(device: torch.device, dtype: torch.dtype, quick: bool = False, prefill: Optional[int] = None,
               batch: Optional[int] = None, seed: int = 0) -> E2EConfig:
    """The preset for ``device`` (or the quick one), with ``prefill`` / ``batch`` overrides."""
    sizes = dict(PRESETS["quick" if quick else "cuda" if device.type == "cuda" else "cpu"])
    if prefill is not None:
        sizes["prefill"] = prefill
    if batch is not None:
        sizes["batch"] = batch
    return E2EConfig(device=device, dtype=dtype, seed=seed, **sizes)


# ---------------------------------------------------------------------------------------------------------
# Model, prompt, caches.
# ---------------------------------------------------------------------------------------------------------


def build_model(cfg: E2EConfig) -> LlamaForCausalLM:
    """A random-weight ``LlamaForCausalLM`` with SDPA attention, in eval mode, on ``cfg.device`` in ``cfg.dtype``."""
    config = LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.prefill + cfg.decode,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    with torch.device(cfg.device):  # initialise on the device: a 1B model initialises slowly on the CPU
        model = LlamaForCausalLM(config)
    return model.to(cfg.dtype).eval()


def make_prompt(cfg: E2EConfig) -> torch.Tensor:
    """``(batch, prefill)`` token ids: one random row, repeated (the same prompt for every mode).

    Every row is the same because the gates are random: their flags hardly depend on the token and mostly on the
    row's context, so a bias calibrated on one random row keeps anywhere from ~5% to ~90% of another row's tokens
    in a head, and the gated cache, as wide as its longest (row, head), would stay near dense size whatever the
    asked ratio. With equal rows every (row, head) evicts the calibrated fraction.
    """
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    row = torch.randint(0, cfg.vocab, (1, cfg.prefill), generator=generator)
    return row.repeat(cfg.batch, 1).to(cfg.device)


def dense_kv_bytes(cache: DynamicCache) -> int:
    """Bytes of the key and value tensors a DynamicCache holds."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# One mode: warm-up, timed prefill, timed decode.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModeResult:
    """What one mode measured. Times in seconds, sizes in bytes; ``tokens`` ``(B, decode)`` on the CPU."""

    prefill_s: float
    decode_s: float
    kv_prefill: int
    kv_decode: int
    gate_bytes: int  # gated: the gates' K'/V' after decode (not in kv_decode); dense: 0
    free_bytes: int  # gated: the pools' free pages after decode; dense: 0
    eviction_prefill: float
    eviction: float  # after decode
    retention_per_layer: List[float]
    peak_bytes: Optional[int]  # CUDA: peak allocated over prefill + decode (weights included)
    tokens: torch.Tensor


def _generate(model: LlamaForCausalLM, prompt: torch.Tensor, cache: object, steps: int,
              after_prefill: Callable[[], None]) -> Tuple[float, float, torch.Tensor]:
    """Prefill ``prompt`` into ``cache``, then ``steps`` greedy single-token forwards.

    ``after_prefill`` runs between the two timed regions. Returns (prefill s, decode s, tokens ``(B, steps)``).
    """
    kwargs = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
    with Stopwatch(prompt.device) as prefill:
        token = model(input_ids=prompt, **kwargs).logits[:, -1].argmax(-1, keepdim=True)
    after_prefill()
    tokens = []
    with Stopwatch(prompt.device) as decode:
        for _ in range(steps):
            tokens.append(token)
            token = model(input_ids=token, **kwargs).logits[:, -1].argmax(-1, keepdim=True)
    return prefill.seconds, decode.seconds, torch.cat(tokens, dim=1).cpu()


def run_mode(model: LlamaForCausalLM, prompt: torch.Tensor, cfg: E2EConfig, gated: bool) -> ModeResult:
    """Warm-up, then the timed prefill + decode of one mode with a fresh cache; measures the cache around decode."""
    new_cache = attngate_ext.AttnGateCache if gated else DynamicCache
    _generate(model, prompt[:, : cfg.warmup_prefill], new_cache(), cfg.warmup_decode, lambda: None)
    _free(cfg.device)
    cuda = cfg.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(cfg.device)
    cache = new_cache()
    at_prefill: Dict[str, object] = {}

    def measure() -> Dict[str, object]:
        if gated:
            return cache.memory_report().as_dict()
        return {"kv_bytes": dense_kv_bytes(cache), "gate_bytes": 0, "free_page_bytes": 0, "eviction_ratio": 0.0,
                "retention_per_layer": [1.0] * len(cache.layers)}

    prefill_s, decode_s, tokens = _generate(model, prompt, cache, cfg.decode, lambda: at_prefill.update(measure()))
    final = measure()
    # More timed runs on fresh caches: the median resists other processes on a shared machine.
    prefills, decodes = [prefill_s], [decode_s]
    for _ in range(cfg.repeats - 1):
        p_s, d_s, _ = _generate(model, prompt, new_cache(), cfg.decode, lambda: None)
        prefills.append(p_s)
        decodes.append(d_s)
    prefill_s, decode_s = statistics.median(prefills), statistics.median(decodes)
    result = ModeResult(
        prefill_s=prefill_s,
        decode_s=decode_s,
        kv_prefill=int(at_prefill["kv_bytes"]),
        kv_decode=int(final["kv_bytes"]),
        gate_bytes=int(final["gate_bytes"]),
        free_bytes=int(final["free_page_bytes"]),
        eviction_prefill=float(at_prefill["eviction_ratio"]),
        eviction=float(final["eviction_ratio"]),
        retention_per_layer=list(final["retention_per_layer"]),
        peak_bytes=torch.cuda.max_memory_allocated(cfg.device) if cuda else None,
        tokens=tokens,
    )
    del cache
    _free(cfg.device)
    return result


# ---------------------------------------------------------------------------------------------------------
# Rows and table.
# ---------------------------------------------------------------------------------------------------------


def _mib(nbytes: Optional[int]) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.2f} MiB"


COLUMNS: List[Column] = [  # cells of a row's extra
    ("mode", 11, lambda r: str(r.extra["mode"])),
    ("evicted", 8, lambda r: f"{100 * r.extra['eviction']:.1f}%"),
    ("prefill ms", 11, lambda r: f"{r.extra['prefill_ms']:.1f}"),
    ("decode tok/s", 13, lambda r: f"{r.extra['decode_tokens_per_s']:.1f}"),
    ("speedup", 8, lambda r: f"{r.extra['decode_speedup']:.2f}x"),
    ("KV prefill", 14, lambda r: _mib(r.extra["kv_bytes_prefill"])),
    ("KV decode", 14, lambda r: _mib(r.extra["kv_bytes_decode"])),
    ("gate K'V'", 12, lambda r: _mib(r.extra["gate_bytes"]) if r.extra["gated"] else "-"),
    ("free pages", 12, lambda r: _mib(r.extra["free_bytes"]) if r.extra["gated"] else "-"),
    ("KV/dense", 9, lambda r: f"{r.extra['kv_ratio_decode']:.3f}"),
    ("target", 7, lambda r: f"{r.extra['kv_target']:.3f}" if r.extra["gated"] else "-"),
    ("KV target", 10, lambda r: ("met" if r.extra["kv_target_met"] else "MISSED") if r.extra["gated"] else "-"),
    ("peak", 14, lambda r: _mib(r.extra["peak_bytes"])),
]
TABLE = Table(COLUMNS, left=1)  # the mode left-aligned, the numbers right-aligned


def print_head(cfg: E2EConfig) -> None:
    """The section's notes and the table head."""
    gate = cfg.gate_config()
    print(f"\nend-to-end: LlamaForCausalLM (random weights, SDPA, {str(cfg.dtype).replace('torch.', '')}): "
          f"{cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads / {cfg.kv_heads} KV heads of dim "
          f"{cfg.head_dim}, MLP {cfg.intermediate}, vocab {cfg.vocab}")
    print(f"run: batch {cfg.batch} (one random prompt row, repeated), prefill {cfg.prefill} tokens, then {cfg.decode} "
          f"greedy single-token forwards (plain loop, no generate()); untimed warm-up of "
          f"{min(cfg.warmup_prefill, cfg.prefill)}+{cfg.warmup_decode} tokens per mode; times: median of "
          f"{cfg.repeats} runs")
    print(f"gates: d'={gate.head_dim}, {gate.num_heads} heads / {gate.num_kv_heads} KV head: their own K'/V' cache "
          f"costs h'_kv*d'/(H*D) = {100 * cfg.gate_cost():.1f}% of dense; prefill_chunk {gate.prefill_chunk}; "
          "randomize_gates + calibrate_gate_bias on the prompt")
    print("evicted: memory_report() after decode; KV: cache bytes after prefill / decode (dense: DynamicCache K/V, "
          "gated: pages held + window ring; the gates' K'V' and the free pages of the pools in their own columns)")
    print(f"KV/dense, target = (1 - evicted) + {KV_SLACK}: after decode (after prefill: in the JSON); speedup: "
          "decode tok/s vs dense; peak: CUDA max allocated, weights incl.\n")
    TABLE.print_head()


def _row(cfg: E2EConfig, mode: str, asked: Optional[float], res: ModeResult, dense: ModeResult) -> Row:
    step_us = res.decode_s / cfg.decode * 1e6
    dense_step_us = dense.decode_s / cfg.decode * 1e6
    ratio = res.kv_decode / dense.kv_decode
    target = (1.0 - res.eviction) + KV_SLACK
    ratio_prefill = res.kv_prefill / dense.kv_prefill
    target_prefill = (1.0 - res.eviction_prefill) + KV_SLACK
    gated = asked is not None
    check = "ok"
    if gated and abs(res.eviction - asked) > EVICTION_TOL:
        check = f"eviction {res.eviction:.3f}, asked {asked} (calibration off by more than {EVICTION_TOL})"
    extra: Dict[str, object] = {
        "mode": mode,
        "gated": gated,
        "asked_eviction": asked,
        "eviction": res.eviction,
        "eviction_after_prefill": res.eviction_prefill,
        "retention_per_layer": res.retention_per_layer,
        "prefill_ms": res.prefill_s * 1e3,
        "decode_s": res.decode_s,
        "decode_tokens_per_s": cfg.batch * cfg.decode / res.decode_s,
        "decode_speedup": dense.decode_s / res.decode_s,
        "kv_bytes_prefill": res.kv_prefill,
        "kv_bytes_decode": res.kv_decode,
        "gate_bytes": res.gate_bytes,
        "free_bytes": res.free_bytes,
        "dense_kv_bytes_decode": dense.kv_decode,
        "kv_ratio_prefill": ratio_prefill,
        "kv_target_prefill": target_prefill,
        "kv_target_met_prefill": ratio_prefill <= target_prefill,
        "kv_ratio_decode": ratio,
        "kv_target": target,
        "kv_target_met": ratio <= target,
        "peak_bytes": res.peak_bytes,
        "same_tokens_as_dense": float((res.tokens == dense.tokens).float().mean()),
        "config": cfg.to_json(),
    }
    return Row(
        section="e2e",
        op=mode,
        shape=cfg.shape(),
        dtype=str(cfg.dtype).replace("torch.", ""),
        device=cfg.device.type,
        op_us=step_us,  # one decode step (B tokens) of this mode
        ref_us=dense_step_us,  # the same step of the dense model
        speedup=dense_step_us / step_us,
        bytes=res.kv_decode,  # KV cache bytes after decode
        gbps=0.0,  # the op-table bandwidth columns do not apply to a whole model; see extra
        copy_gbps=0.0,
        pct_copy=0.0,
        check=check,
        extra=extra,
    )


@torch.no_grad()
def run_e2e(cfg: E2EConfig) -> List[Row]:
    """Dense, then gated at every eviction of ``cfg.evictions``; prints the table, returns one Row per mode."""
    print_head(cfg)
    model = build_model(cfg)
    prompt = make_prompt(cfg)
    dense = run_mode(model, prompt, cfg, gated=False)
    rows = [_row(cfg, "dense", None, dense, dense)]
    TABLE.print_row(rows[-1])
    attngate_ext.add_attention_gates(model, cfg.gate_config())
    for eviction in cfg.evictions:
        randomize_gates(model, seed=cfg.seed)  # every mode starts from the same gates, bias 0
        calibrate_gate_bias(model, prompt[:1], eviction)  # every row is this one
        _free(cfg.device)
        rows.append(_row(cfg, f"gated@{eviction:g}", eviction, run_mode(model, prompt, cfg, gated=True), dense))
        TABLE.print_row(rows[-1])
    del model, prompt
    _free(cfg.device)
    return rows


def e2e_section(run_cfg: Config) -> List[Row]:
    """The run.py section: the preset of the run's device (``--quick``: tiny), its dtype and seed, the overrides."""
    return run_e2e(e2e_config(run_cfg.device, run_cfg.dtype, run_cfg.quick, run_cfg.e2e_prefill,
                              run_cfg.e2e_batch, run_cfg.seed))
