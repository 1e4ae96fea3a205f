"""Rectangle-op section: ``gate_flags``, ``append_kv_``, ``compact_kv_`` and ``decode_attention`` against their
pure-PyTorch references (``attngate_ext.reference``), side by side.

Each row: median op time and median reference time (after warm-up), speedup = reference / op, achieved GB/s of the
op under the bytes model stated in each case function, and the measured bandwidth of a ``dst.copy_(src)`` moving the
same number of bytes. Mutating ops restore ``lengths`` before every repetition, outside the timed region; a
correctness check runs once per case before timing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from attngate_ext import reference
from benchmarks.config import Config
from benchmarks.printer import Column, Row, Table, bandwidth_columns, timed_columns
from benchmarks.timing import CopyBandwidth, gbps, median_us

OPS = torch.ops.attngate
# Tolerance of the one-off correctness check of decode_attention (float32 accumulation on both sides).
DECODE_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}

COLUMNS: List[Column] = timed_columns(17, 26) + bandwidth_columns()


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


# ---- cases: inputs, bytes model and check of each op. Flags are random at cfg.keep_ratio; lengths ~= T per head ----


def _reading_case(op: str, shape: str, args: tuple, nbytes: int, check: Callable[[], str]) -> Case:
    """The case of an op that writes nothing (``op`` and its reference called with the same ``args``)."""
    return Case(op=op, shape=shape, run_op=lambda: getattr(OPS, op).default(*args),
                run_ref=lambda: getattr(reference, op)(*args), nbytes=nbytes, check=check)


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

    return _reading_case("gate_flags", f"B{B} T{T} G{G} H{H}", args, nbytes, check)


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

    return _reading_case("decode_attention", f"B{B} Hq{Hq} H{H} C{C} D{D}", args, nbytes, check)


CASES: Dict[str, Callable[[Config, int, torch.Generator], Case]] = {
    "gate_flags": case_gate_flags,
    "append_kv_": case_append_kv,
    "compact_kv_": case_compact_kv,
    "decode_attention": case_decode_attention,
}


# ---- the section -------------------------------------------------------------------------------------------------


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


def rect_ops_section(cfg: Config) -> List[Row]:
    """Every selected rectangle op at every sequence length, against its reference."""
    print(f"inputs: keep ratio {cfg.keep_ratio}, gate dim G={cfg.gate_dim}, GQA group {cfg.group}, "
          "lengths ~= T (per-head spread of T/16), cache capacity C = T")
    print("speedup = reference time / op time (gate_flags' reference is the unfused composition: matmul + "
          "sigmoid + transpose + compare + masks);\nGB/s = bytes read + written by the op (model in each case "
          "function) / op time; copy GB/s = dst.copy_(src) moving as many bytes\n")
    copy = CopyBandwidth(cfg.device, cfg.reps, cfg.warmup)
    table = Table(COLUMNS)
    table.print_head()
    rows = []
    for T in cfg.seqs:
        for name in cfg.ops:
            gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
            rows.append(time_case(cfg, CASES[name](cfg, T, gen), copy, "ops"))
            table.print_row(rows[-1])
    return rows
