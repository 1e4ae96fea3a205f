#!/usr/bin/env python
"""Benchmarks every ``torch.ops.attngate`` op against its pure-PyTorch reference, side by side, then a whole model.

    python benchmarks/run.py                   # CPU: B=1 H=8 T=4096 D=128 float32; GPU: T in 4096, 32768, bf16
    python benchmarks/run.py --quick           # tiny smoke run (seconds)
    python benchmarks/run.py --ops compact_kv_ append_kv_ --seq 8192 --dtype bfloat16 --sections ops
    python benchmarks/run.py --sections e2e --e2e-prefill 2048 --e2e-batch 4
    python benchmarks/run.py --real            # also SmolLM2-135M: memory with trained gates, 8k prefill/decode

Each row: median op time and median reference time (after warm-up), speedup = reference / op, achieved
GB/s of the op under the bytes model stated in each case function, and the measured bandwidth of a
``dst.copy_(src)`` moving the same number of bytes. Mutating ops restore ``lengths`` before every repetition,
outside the timed region. On CUDA the ops run with the device-side value checks' host read-back OFF
(``attngate_ext.sync_checks(False)``), so a correctness check runs once per case before timing.

The end-to-end section (``benchmarks/e2e.py``, its own table) prefills and decodes a random-weight Llama-style
model, dense vs gated at 0 / 50 / 75% eviction: prefill time, decode tokens/s and KV-cache bytes. The memory section
(``benchmarks/peak_memory.py``) measures the peak memory of a 16k-token chunked prefill, dense vs gated; the real-model
section (``benchmarks/real_model.py``, ``--real``) runs SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/run.py` from a source checkout (in-place build)
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import attngate_ext  # noqa: E402
from attngate_ext import reference  # noqa: E402
from benchmarks.decode_bandwidth import decode_bandwidth_section  # noqa: E402
from benchmarks.e2e import e2e_section  # noqa: E402
from benchmarks.paged_attention import paged_attention_section  # noqa: E402
from benchmarks.paged_storage import paged_storage_section  # noqa: E402
from benchmarks.peak_memory import peak_memory_section  # noqa: E402
from benchmarks.real_model import real_model_section  # noqa: E402
from benchmarks.report import Row, environment, print_row, print_table_head  # noqa: E402
from benchmarks.timing import CopyBandwidth, gbps, median_us  # noqa: E402

OPS = torch.ops.attngate
OP_NAMES = ["gate_flags", "append_kv_", "compact_kv_", "decode_attention"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Tolerance of the one-off correctness check of decode_attention (float32 accumulation on both sides).
DECODE_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclass
class Config:
    """Everything a section needs to build and time its cases."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    heads: int
    seqs: List[int]
    head_dim: int
    gate_dim: int
    group: int
    keep_ratio: float
    ops: List[str]
    reps: int
    warmup: int
    ref_reps: int
    ref_warmup: int
    flush_l2: bool
    seed: int = 0
    sections: List[str] = field(default_factory=lambda: [name for name, _ in SECTIONS])
    quick: bool = False  # the e2e section then uses its tiny model
    e2e_prefill: Optional[int] = None  # e2e overrides of its device preset
    e2e_batch: Optional[int] = None


@dataclass
class Case:
    """One op at one shape: the op and its reference as thunks on shared inputs, and the bytes model."""

    op: str
    shape: str
    run_op: Callable[[], object]
    run_ref: Callable[[], object]
    nbytes: int  # bytes read + written by the op (the bytes model of the case function)
    check: Callable[[], str]  # runs op and reference once on copies; "ok" or what differs
    setup: Optional[Callable[[], object]] = None  # restores the state before every repetition (untimed)


# ---------------------------------------------------------------------------------------------------------
# Cases: inputs, bytes model and check of each op. Flags are random at cfg.keep_ratio; lengths ~= T per head.
# ---------------------------------------------------------------------------------------------------------


def _esize(cfg: Config) -> int:
    return torch.empty((), dtype=cfg.dtype).element_size()


def _randn(cfg: Config, gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=cfg.device, dtype=torch.float32).to(cfg.dtype)


def _flags(cfg: Config, gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=cfg.device) < cfg.keep_ratio


def _lengths_near(cfg: Config, gen: torch.Generator, T: int) -> torch.Tensor:
    """(B, H) int32 lengths in (T - T/16, T]: every head nearly full, no two alike."""
    spread = max(T // 16, 1)
    drop = torch.randint(0, spread, (cfg.batch, cfg.heads), generator=gen, device=cfg.device)
    return (T - drop).to(torch.int32)


def _live_mask(lengths: torch.Tensor, C: int) -> torch.Tensor:
    return torch.arange(C, device=lengths.device).view(1, 1, C) < lengths.unsqueeze(-1)


def case_gate_flags(cfg: Config, T: int, gen: torch.Generator) -> Case:
    """gate_flags vs the unfused composition (reference: matmul + sigmoid + transpose + compare + masks).

    Bytes model: reads gate_out (B*T*G) + weight (H*G) + bias (H) in the input dtype; writes probs (4 B) and
    keep (1 B) per (b, h, t).
    """
    B, H, G = cfg.batch, cfg.heads, cfg.gate_dim
    gate_out = _randn(cfg, gen, B, T, G)
    weight = (_randn(cfg, gen, H, G).float() / math.sqrt(G)).to(cfg.dtype)  # logits ~ N(0, 1)
    bias = torch.zeros(H, device=cfg.device, dtype=cfg.dtype)
    # P(sigmoid(N(0,1)) >= threshold) = keep_ratio.
    threshold = float(torch.sigmoid(torch.special.ndtri(torch.tensor(1.0 - cfg.keep_ratio, dtype=torch.float64))))
    args = (gate_out, weight, bias, threshold, 4, 0, None)  # 4 sink tokens, no padding
    es = _esize(cfg)
    nbytes = (B * T * G + H * G + H) * es + B * H * T * (4 + 1)

    def check() -> str:
        probs, keep = OPS.gate_flags.default(*args)
        rprobs, rkeep = reference.gate_flags(*args)
        err = (probs - rprobs).abs().max().item()
        flips = (keep != rkeep).float().mean().item()
        return "ok" if err <= 1e-4 and flips <= 1e-3 else f"MISMATCH probs err {err:.2e}, keep flips {flips:.1e}"

    return Case(
        op="gate_flags",
        shape=f"B{B} T{T} G{G} H{H}",
        run_op=lambda: OPS.gate_flags.default(*args),
        run_ref=lambda: reference.gate_flags(*args),
        nbytes=nbytes,
        check=check,
    )


def case_append_kv(cfg: Config, T: int, gen: torch.Generator) -> Case:
    """append_kv_ of T new tokens (kept at cfg.keep_ratio) into a cache of capacity C = T.

    Start lengths are spread over [0, C - kept] per head, so no head overflows; every repetition starts from
    them again. Bytes model: reads the kept rows of key and value, the keep flags (1 B each) and lengths;
    writes the kept rows into both caches and lengths.
    """
    B, H, D, C = cfg.batch, cfg.heads, cfg.head_dim, T
    key_cache, value_cache = _randn(cfg, gen, B, H, C, D), _randn(cfg, gen, B, H, C, D)
    key, value = _randn(cfg, gen, B, H, T, D), _randn(cfg, gen, B, H, T, D)
    keep = _flags(cfg, gen, B, H, T)
    counts = keep.sum(-1)
    room = torch.rand(B, H, generator=gen, device=cfg.device)
    start = ((C - counts) * room).floor().to(torch.int32)
    lengths = start.clone()
    kept_rows = int(counts.sum())
    nbytes = 2 * (2 * kept_rows * D * _esize(cfg)) + B * H * T + 2 * 4 * B * H

    def check() -> str:
        a = [key_cache.clone(), value_cache.clone(), start.clone()]
        r = [key_cache.clone(), value_cache.clone(), start.clone()]
        OPS.append_kv_.default(*a, key, value, keep)
        reference.append_kv_(*r, key, value, keep)
        same = all(torch.equal(x, y) for x, y in zip(a, r))
        return "ok" if same else "MISMATCH (caches or lengths differ)"

    return Case(
        op="append_kv_",
        shape=f"B{B} H{H} T{T} C{C} D{D}",
        run_op=lambda: OPS.append_kv_.default(key_cache, value_cache, lengths, key, value, keep),
        run_ref=lambda: reference.append_kv_(key_cache, value_cache, lengths, key, value, keep),
        nbytes=nbytes,
        check=check,
        setup=lambda: lengths.copy_(start),
    )


def case_compact_kv(cfg: Config, T: int, gen: torch.Generator) -> Case:
    """compact_kv_ of a nearly full cache (C = T, lengths ~= T) with flags kept at cfg.keep_ratio.

    The data movement depends only on flags and lengths, so only lengths are restored between repetitions.
    Bytes model: each kept row after a head's first dropped row moves (the kept prefix stays in place): read +
    write, key and value; plus the live flags (1 B each) read and lengths read + written.
    """
    B, H, D, C = cfg.batch, cfg.heads, cfg.head_dim, T
    key_cache, value_cache = _randn(cfg, gen, B, H, C, D), _randn(cfg, gen, B, H, C, D)
    start = _lengths_near(cfg, gen, T)
    lengths = start.clone()
    keep = _flags(cfg, gen, B, H, T)
    live = _live_mask(start, C)
    kept_live = keep & live
    prefix = torch.minimum(keep.float().cumprod(-1).sum(-1).long(), start.long())  # kept rows that stay put
    moved_rows = int(kept_live.sum()) - int(prefix.sum())
    nbytes = 2 * 2 * moved_rows * D * _esize(cfg) + int(start.sum()) + 2 * 4 * B * H

    def check() -> str:
        a = [key_cache.clone(), value_cache.clone(), start.clone()]
        r = [key_cache.clone(), value_cache.clone(), start.clone()]
        OPS.compact_kv_.default(*a, keep)
        reference.compact_kv_(*r, keep)
        if not torch.equal(a[2], r[2]):
            return "MISMATCH (lengths differ)"
        new_live = _live_mask(r[2], C)
        same = torch.equal(a[0][new_live], r[0][new_live]) and torch.equal(a[1][new_live], r[1][new_live])
        return "ok" if same else "MISMATCH (live rows differ)"

    return Case(
        op="compact_kv_",
        shape=f"B{B} H{H} C{C} D{D}",
        run_op=lambda: OPS.compact_kv_.default(key_cache, value_cache, lengths, keep),
        run_ref=lambda: reference.compact_kv_(key_cache, value_cache, lengths, keep),
        nbytes=nbytes,
        check=check,
        setup=lambda: lengths.copy_(start),
    )


def case_decode_attention(cfg: Config, T: int, gen: torch.Generator) -> Case:
    """decode_attention of Hq = group * H query heads (GQA) over a cache of C = T rows, lengths ~= T.

    Bytes model: reads each KV head's live key and value rows once, the query and lengths; writes the output.
    """
    B, H, D, C = cfg.batch, cfg.heads, cfg.head_dim, T
    Hq = cfg.group * H
    key_cache, value_cache = _randn(cfg, gen, B, H, C, D), _randn(cfg, gen, B, H, C, D)
    lengths = _lengths_near(cfg, gen, T)
    query = _randn(cfg, gen, B, Hq, D)
    scale = 1.0 / math.sqrt(D)
    es = _esize(cfg)
    nbytes = 2 * int(lengths.sum()) * D * es + 2 * B * Hq * D * es + 4 * B * H
    args = (query, key_cache, value_cache, lengths, scale)

    def check() -> str:
        out = OPS.decode_attention.default(*args).float()
        ref = reference.decode_attention(*args).float()
        tol = DECODE_TOL[cfg.dtype]
        err = (out - ref).abs().max().item()
        return "ok" if torch.allclose(out, ref, atol=tol, rtol=tol) else f"MISMATCH max err {err:.2e}"

    return Case(
        op="decode_attention",
        shape=f"B{B} Hq{Hq} H{H} C{C} D{D}",
        run_op=lambda: OPS.decode_attention.default(*args),
        run_ref=lambda: reference.decode_attention(*args),
        nbytes=nbytes,
        check=check,
    )


CASES: Dict[str, Callable[[Config, int, torch.Generator], Case]] = {
    "gate_flags": case_gate_flags,
    "append_kv_": case_append_kv,
    "compact_kv_": case_compact_kv,
    "decode_attention": case_decode_attention,
}


# ---------------------------------------------------------------------------------------------------------
# Sections: each prints its table and returns its rows (``Row.extra`` holds what a section adds to them).
# ---------------------------------------------------------------------------------------------------------


def time_case(cfg: Config, case: Case, copy: CopyBandwidth, section: str) -> Row:
    """Checks the case once, then times op and reference (same setup) and the copy of the same bytes."""
    check = case.check()
    op_us = median_us(case.run_op, cfg.device, cfg.reps, cfg.warmup, case.setup, cfg.flush_l2)
    ref_us = median_us(case.run_ref, cfg.device, cfg.ref_reps, cfg.ref_warmup, case.setup, cfg.flush_l2)
    op_gbps = gbps(case.nbytes, op_us)
    copy_gbps = copy.measure(case.nbytes)
    return Row(
        section=section,
        op=case.op,
        shape=case.shape,
        dtype=str(cfg.dtype).replace("torch.", ""),
        device=cfg.device.type,
        op_us=op_us,
        ref_us=ref_us,
        speedup=ref_us / op_us,
        bytes=case.nbytes,
        gbps=op_gbps,
        copy_gbps=copy_gbps,
        pct_copy=100.0 * op_gbps / copy_gbps,
        check=check,
    )


def ops_section(cfg: Config) -> List[Row]:
    """Every selected op at every sequence length, against its reference."""
    copy = CopyBandwidth(cfg.device, cfg.reps, cfg.warmup)
    print_table_head()
    rows = []
    for T in cfg.seqs:
        for name in cfg.ops:
            gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
            rows.append(time_case(cfg, CASES[name](cfg, T, gen), copy, "ops"))
            print_row(rows[-1])
    rows += paged_storage_section(cfg)  # paged storage ops, their own table (benchmarks/paged_storage.py)
    return rows + paged_attention_section(cfg)  # its own table (benchmarks/paged_attention.py)


SECTIONS: List[Tuple[str, Callable[[Config], List[Row]]]] = [
    ("ops", ops_section),
    ("bandwidth", decode_bandwidth_section),  # CUDA: decode / append / compaction against copy bandwidth
    ("e2e", e2e_section),  # end-to-end model: dense vs gated prefill + decode (benchmarks/e2e.py)
    ("memory", peak_memory_section),  # peak memory of a long chunked prefill (benchmarks/peak_memory.py)
    ("real", real_model_section),  # SmolLM2: memory and speed, only with --real (benchmarks/real_model.py)
]


# ---------------------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------------------


def print_header(head: Dict[str, object], cfg: Config) -> None:
    print(f"attngate_ext {head['attngate_ext']} benchmarks | torch {head['torch']} (CUDA {head['cuda']}) | "
          f"{head['device']} | threads {head['threads']} (load avg {head['load_avg_1min']}) | "
          f"sync checks {head['sync_checks']}")
    print(f"timing: median of {cfg.reps} reps after {cfg.warmup} warm-up ({cfg.ref_reps}/{cfg.ref_warmup} for "
          f"references), {head['timing']}" + (", L2 flushed before each rep" if head["l2_flush"] else ""))
    print(f"inputs: keep ratio {cfg.keep_ratio}, gate dim G={cfg.gate_dim}, GQA group {cfg.group}, "
          "lengths ~= T (per-head spread of T/16), cache capacity C = T")
    print("speedup = reference time / op time (gate_flags' reference is the unfused composition: matmul + "
          "sigmoid + transpose + compare + masks);\nGB/s = bytes read + written by the op (model in each case "
          "function) / op time; copy GB/s = dst.copy_(src) moving as many bytes\n")


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--ops", nargs="+", choices=OP_NAMES, default=OP_NAMES, metavar="OP", help=f"subset of ops to run, from {OP_NAMES} (default: all)")
    p.add_argument("--batch", type=int, default=None, help="B (default 1)")
    p.add_argument("--heads", type=int, default=None, help="H, KV heads (default 8)")
    p.add_argument("--seq", type=int, nargs="+", default=None,
                   help="T values, new tokens = cache capacity (default 4096 on CPU, 4096 32768 on CUDA)")
    p.add_argument("--head-dim", type=int, default=None, help="D (default 128)")
    p.add_argument("--gate-dim", type=int, default=64, help="G, gate output width (gate head dim x heads; default 64)")
    p.add_argument("--group", type=int, default=4, help="query heads per KV head in decode, Hq = group * H (default 4)")
    p.add_argument("--keep-ratio", type=float, default=0.5, help="fraction of keep flags that are true (default 0.5)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 15 CPU, 50 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up repetitions (default 3 CPU, 10 CUDA)")
    p.add_argument("--ref-reps", type=int, default=None, help="reference repetitions (default: reps on CPU, 10 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-flush", action="store_true", help="CUDA: do not flush the L2 cache between reps")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: B=1 H=2 T=256 D=64, 3 reps; tiny e2e model")
    names = [name for name, _ in SECTIONS]
    p.add_argument("--sections", nargs="+", choices=names, default=None, metavar="SECTION",
                   help=f"sections to run, from {names} (default: all but real)")
    p.add_argument("--real", action="store_true",
                   help="add the real-model section (SmolLM2-135M, prepared by examples/real_assets.py; minutes)")
    p.add_argument("--e2e-prefill", type=int, default=None, help="e2e prompt tokens (default 1024 CPU, 4096 CUDA)")
    p.add_argument("--e2e-batch", type=int, default=None, help="e2e batch (default 1 CPU, 16 CUDA)")
    p.add_argument("--json", type=Path, default=None,
                   help="output file (default benchmarks/results/latest.json, quick.json with --quick)")
    return p.parse_args(argv)


def _sections(args: argparse.Namespace) -> List[str]:
    """--sections (default: every section but real), plus real with --real; in SECTIONS order."""
    chosen = set(args.sections or [name for name, _ in SECTIONS if name != "real"])
    if args.real:
        chosen.add("real")
    return [name for name, _ in SECTIONS if name in chosen]


def make_config(args: argparse.Namespace) -> Config:
    """Resolves the defaults that depend on the device and on --quick."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def pick(value, quick, cpu, gpu):
        return value if value is not None else quick if args.quick else gpu if cuda else cpu

    reps = pick(args.reps, 3, 15, 50)
    warmup = pick(args.warmup, 1, 3, 10)
    return Config(
        device=device,
        dtype=DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32),
        batch=pick(args.batch, 1, 1, 1),
        heads=pick(args.heads, 2, 8, 8),
        seqs=pick(args.seq, [256], [4096], [4096, 32768]),
        head_dim=pick(args.head_dim, 64, 128, 128),
        gate_dim=args.gate_dim,
        group=args.group,
        keep_ratio=args.keep_ratio,
        ops=list(dict.fromkeys(args.ops)),
        reps=reps,
        warmup=warmup,
        ref_reps=pick(args.ref_reps, 3, reps, min(reps, 10)),
        ref_warmup=min(warmup, 3) if cuda else warmup,
        flush_l2=not args.no_flush,
        sections=_sections(args),
        quick=args.quick,
        e2e_prefill=args.e2e_prefill,
        e2e_batch=args.e2e_batch,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = make_config(args)
    if cfg.device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
        if not attngate_ext.cuda_kernels_available():
            raise SystemExit("--device cuda: attngate_ext was built without CUDA kernels "
                             "(rebuild with ATTNGATE_CUDA=1, or pass --device cpu)")
        if cfg.device.index is None:  # torch.cuda.set_device needs an index
            cfg.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(cfg.device)
    head = environment(cfg.device, cfg.flush_l2)
    print_header(head, cfg)
    rows: List[Row] = []
    checks = attngate_ext.sync_checks(False) if cfg.device.type == "cuda" else contextlib.nullcontext()
    with checks, torch.no_grad():
        for name, section in SECTIONS:
            if name in cfg.sections:
                rows += section(cfg)
    default = ROOT / "benchmarks" / "results" / ("quick.json" if args.quick else "latest.json")
    out = args.json or default
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, (torch.device, torch.dtype)) else v for k, v in asdict(cfg).items()}
    out.write_text(json.dumps({"header": head, "config": config, "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"\nwrote {len(rows)} rows to {out}")
    mismatches = [r for r in rows if r.check != "ok"]
    for r in mismatches:
        print(f"CHECK FAILED: {r.op} {r.shape}: {r.check}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
