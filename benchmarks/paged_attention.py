"""Paged attention section: ``paged_decode_attention`` and ``paged_prefill_attention`` against their pure-PyTorch
references (``attngate_ext.paged_reference``) and against ``F.scaled_dot_product_attention`` on dense tensors of the
same shapes (what the dense model runs), side by side in one run.

* decode: one query token per head, Hq = group * H, over L paged rows per KV head (page size 16, shuffled page
  ids); SDPA over a dense (B, Hq, L, D) cache (the KV heads repeated, as the dense model attends).
  Bytes model: each KV head's K and V rows read once, the query read and the output written.
* prefill ``empty``: a T-token chunk, empty cache, every token kept, no padding: SDPA(is_causal=True) on dense
  (B, Hq, T, D) keys and values. ``filled``: the same after ``cached`` kept rows in the pages; SDPA with the boolean
  mask of a causal chunk after a full cache. ``gated``: keep ratio 0.5, window 64, empty cache, against the same
  dense causal SDPA (the dense model's prefill).
  GFLOP/s: 4 * D flops per visible (query head, query, key) triple; GB/s: queries, chunk keys / values and the
  cached rows read once, output written.

CPU: op and SDPA alternate rep by rep (load changes hit both alike); medians, and the minima (on cores shared
with other processes a parallel region can lose whole scheduler slices, which the minima leave out). CUDA:
``torch.cuda.Event`` medians with the L2 flushed; decode GB/s next to a measured ``dst.copy_(src)`` of the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

import attngate_ext
from attngate_ext import paged_reference
from attngate_ext.gate.masks import block_visibility
from benchmarks.config import Config
from benchmarks.printer import Column, Row, Table
from benchmarks.timing import CopyBandwidth, gbps, interleaved_us, median_us

OPS = torch.ops.attngate
PAGE = 16
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}

# (B, Hq, H, L, D) decode shapes; (kind, B, Hq, H, T, D, cached rows, keep ratio) prefill shapes.
DECODE = {
    "cpu": [(1, 9, 3, 2048, 64), (1, 9, 3, 8192, 64), (4, 9, 3, 2048, 64), (4, 9, 3, 8192, 64)],
    "cuda": [(1, 32, 8, 4096, 128), (1, 32, 8, 32768, 128), (16, 32, 8, 4096, 128), (16, 32, 8, 32768, 128)],
    "quick": [(1, 9, 3, 256, 64)],
}
PREFILL = {
    "cpu": [("empty", 1, 8, 8, 1024, 32, 0, 1.0), ("empty", 1, 9, 3, 512, 64, 0, 1.0),
            ("empty", 1, 9, 3, 1024, 64, 0, 1.0), ("empty", 1, 9, 3, 2048, 64, 0, 1.0),
            ("filled", 1, 9, 3, 512, 64, 2048, 1.0), ("gated", 1, 9, 3, 1024, 64, 0, 0.5)],
    "cuda": [("empty", 1, 32, 8, 4096, 128, 0, 1.0), ("filled", 1, 32, 8, 1024, 128, 8192, 1.0),
             ("gated", 1, 32, 8, 4096, 128, 0, 0.5)],
    "quick": [("empty", 1, 9, 3, 128, 64, 0, 1.0), ("filled", 1, 9, 3, 64, 64, 256, 1.0)],
}
WINDOW = 64


@dataclass
class Case:
    op: str
    kind: str
    shape: str
    run_op: Callable[[], object]
    run_sdpa: Callable[[], object]
    run_ref: Callable[[], object]
    nbytes: int
    flops: int


def _paged(B: int, H: int, L: int, D: int, dtype, device, gen) -> Tuple[torch.Tensor, ...]:
    """A full paged cache of L rows per head on shuffled pages; also its rows as dense (B, H, L, D) tensors."""
    pages = max(1, (L + PAGE - 1) // PAGE)
    P = B * H * pages
    key_pages = torch.randn(P, PAGE, D, generator=gen).to(device=device, dtype=dtype)
    value_pages = torch.randn(P, PAGE, D, generator=gen).to(device=device, dtype=dtype)
    table = torch.randperm(P, generator=gen).to(torch.int32).view(B, H, pages).to(device)
    lengths = torch.full((B, H), L, dtype=torch.int32, device=device)
    keys, values, _ = attngate_ext.gather_pages(key_pages, value_pages, table, lengths)
    return key_pages, value_pages, table, lengths, keys, values


def decode_case(B, Hq, H, L, D, dtype, device, gen) -> Case:
    key_pages, value_pages, table, lengths, keys, values = _paged(B, H, L, D, dtype, device, gen)
    group = Hq // H
    query = torch.randn(B, Hq, D, generator=gen).to(device=device, dtype=dtype)
    dense_k = keys.repeat_interleave(group, 1).contiguous()
    dense_v = values.repeat_interleave(group, 1).contiguous()
    q4 = query.unsqueeze(2)
    args = (query, key_pages, value_pages, table, lengths, D**-0.5)
    es = torch.empty((), dtype=dtype).element_size()
    return Case("paged_decode_attention", "decode", f"B{B} Hq{Hq} H{H} L{L} D{D}",
                lambda: OPS.paged_decode_attention.default(*args),
                lambda: F.scaled_dot_product_attention(q4, dense_k, dense_v),
                lambda: paged_reference.paged_decode_attention(*args),
                2 * B * H * L * D * es + 2 * B * Hq * D * es, 4 * B * Hq * L * D)


def prefill_case(kind, B, Hq, H, T, D, cached, keep_ratio, dtype, device, gen) -> Case:
    key_pages, value_pages, table, lengths, keys, values = _paged(B, H, cached, D, dtype, device, gen)
    if cached == 0:
        lengths.zero_()
    group = Hq // H
    query = torch.randn(B, Hq, T, D, generator=gen).to(device=device, dtype=dtype)
    key = torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype)
    value = torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype)
    keep = (torch.rand(B, H, T, generator=gen) < keep_ratio).to(device)
    args = (query, key_pages, value_pages, table, lengths, key, value, keep, None, WINDOW, D**-0.5)
    dense_k = torch.cat([keys, key], 2).repeat_interleave(group, 1).contiguous()
    dense_v = torch.cat([values, value], 2).repeat_interleave(group, 1).contiguous()
    if cached == 0:
        run_sdpa = lambda: F.scaled_dot_product_attention(query, dense_k, dense_v, is_causal=True)  # noqa: E731
    else:
        pos = torch.arange(T, device=device).view(T, 1)
        mask = torch.arange(cached + T, device=device).view(1, -1) <= pos + cached
        run_sdpa = lambda: F.scaled_dot_product_attention(query, dense_k, dense_v, attn_mask=mask)  # noqa: E731
    es = torch.empty((), dtype=dtype).element_size()
    chunk_pairs = int(block_visibility(keep, None, WINDOW).sum()) * group  # visible (query head, key) pairs
    note = f" keep {keep_ratio:g} w{WINDOW}" if kind == "gated" else ""
    return Case("paged_prefill_attention", kind, f"B{B} Hq{Hq} H{H} T{T} L{cached} D{D}{note}",
                lambda: OPS.paged_prefill_attention.default(*args), run_sdpa,
                lambda: paged_reference.paged_prefill_attention(*args),
                (2 * B * Hq * T * D + 2 * B * H * T * D + 2 * B * H * cached * D) * es,
                4 * D * (B * Hq * T * cached + chunk_pairs))


def _check(case: Case, dtype) -> str:
    out, ref = case.run_op(), case.run_ref()
    err = (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0
    return "ok" if err <= TOL[dtype] else f"MISMATCH max err {err:.2e}"


def time_case(cfg: Config, case: Case, copy: CopyBandwidth) -> Row:
    check = _check(case, cfg.dtype)
    if cfg.device.type == "cpu":
        (op_us, op_min), (sdpa_us, sdpa_min) = interleaved_us([case.run_op, case.run_sdpa], cfg.reps, cfg.warmup)
    else:
        op_us = op_min = median_us(case.run_op, cfg.device, cfg.reps, cfg.warmup, None, cfg.flush_l2)
        sdpa_us = sdpa_min = median_us(case.run_sdpa, cfg.device, cfg.reps, cfg.warmup, None, cfg.flush_l2)
    ref_reps = max(1, min(cfg.ref_reps, 5))
    ref_us = median_us(case.run_ref, cfg.device, ref_reps, min(cfg.ref_warmup, 1), None, cfg.flush_l2)
    op_gbps = gbps(case.nbytes, op_us)
    copy_gbps = copy.measure(case.nbytes)
    return Row(section="paged", op=case.op, shape=case.shape, dtype=str(cfg.dtype).replace("torch.", ""),
               device=cfg.device.type, op_us=op_us, ref_us=ref_us, speedup=ref_us / op_us, bytes=case.nbytes,
               gbps=op_gbps, copy_gbps=copy_gbps, pct_copy=100.0 * op_gbps / copy_gbps, check=check,
               extra={"kind": case.kind, "sdpa_us": sdpa_us, "sdpa_over_op": sdpa_us / op_us, "op_min_us": op_min,
                      "sdpa_min_us": sdpa_min, "gflops": case.flops / op_us / 1e3})


COLUMNS: List[Column] = [
    ("op", 8, lambda r: r.extra["kind"]),
    ("shape", 38, lambda r: r.shape),
    ("dtype", 8, lambda r: r.dtype),
    ("op µs", 9, lambda r: f"{r.op_us:.0f}"),
    ("SDPA µs", 9, lambda r: f"{r.extra['sdpa_us']:.0f}"),
    ("SDPA/op", 8, lambda r: f"{r.extra['sdpa_over_op']:.2f}x"),
    ("op min", 8, lambda r: f"{r.extra['op_min_us']:.0f}"),
    ("SDPA min", 9, lambda r: f"{r.extra['sdpa_min_us']:.0f}"),
    ("ref µs", 9, lambda r: f"{r.ref_us:.0f}"),
    ("ref/op", 7, lambda r: f"{r.speedup:.1f}x"),
    ("GFLOP/s", 8, lambda r: f"{r.extra['gflops']:.1f}"),
    ("GB/s", 7, lambda r: f"{r.gbps:.1f}"),
    ("copy GB/s", 9, lambda r: f"{r.copy_gbps:.1f}"),
    ("check", 0, lambda r: r.check),
]


def paged_attention_section(cfg: Config) -> List[Row]:
    """Decode then prefill cases of the run's device (``--quick``: tiny ones), in the run's dtype."""
    preset = "quick" if cfg.quick else cfg.device.type
    print(f"\npaged attention ({cfg.dtype}, page size {PAGE}, shuffled pages): op vs SDPA on dense tensors of the "
          "same shapes (the dense model's attention) and vs the pure-PyTorch reference; SDPA/op > 1: op faster")
    table = Table(COLUMNS)
    table.print_head()
    copy = CopyBandwidth(cfg.device, cfg.reps, cfg.warmup)
    rows: List[Row] = []
    gen = torch.Generator().manual_seed(cfg.seed)
    cases: List[Callable[[], Case]] = [
        (lambda s=s: decode_case(*s, cfg.dtype, cfg.device, gen)) for s in DECODE[preset]
    ] + [(lambda s=s: prefill_case(*s, cfg.dtype, cfg.device, gen)) for s in PREFILL[preset]]
    for make in cases:
        case = make()
        rows.append(time_case(cfg, case, copy))
        table.print_row(rows[-1])
        del case
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":  # python -m benchmarks.paged_attention [run.py options]: this section alone
    import sys

    from benchmarks.config import make_config, parse_args

    args = parse_args(sys.argv[1:], description=__doc__)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_cfg = make_config(args)
    with attngate_ext.sync_checks(False) if run_cfg.device.type == "cuda" else torch.no_grad(), torch.no_grad():
        failed = [r for r in paged_attention_section(run_cfg) if r.check != "ok"]
    sys.exit(1 if failed else 0)
