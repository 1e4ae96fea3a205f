"""Decode bandwidth section (``run.py --sections bandwidth``, CUDA only): the paged decode attention, append and
compaction kernels as a fraction of the measured copy bandwidth, at serving shapes.

* decode: ``paged_decode_attention`` over B x 8 KV heads of L rows each (page size 16, shuffled pages), D = 128,
  bfloat16, GQA groups 1 / 4 / 8, B in 4, 16, 64, L in 4k and 32k (the B = 64 x 32k caches are left out above
  24 GiB). Bytes model: every K and V row read once, the queries read and the outputs written. Every case is
  checked once against ``F.scaled_dot_product_attention`` (GQA) on the same rows, one batch row at a time.
* ragged decode: the same at B = 16, group 4, with per-head lengths spread over [L / 8, L] (the gated cache's
  shape: heads keep different fractions), against the same bytes model.
* append: T = 4096 new rows of every head, half of them kept (a prefill chunk), B = 16; compaction: L = 32k rows
  per head, half kept. Bytes model: the rows written (append) or the rows that move, read and written
  (compaction).

Each row: median time (CUDA events, L2 flushed before each repetition), GB/s under the bytes model, the copy
bandwidth of a ``dst.copy_(src)`` moving the same bytes, and the ratio. The target is 85% of copy at B >= 16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Tuple

import torch
import torch.nn.functional as F

import attngate_ext
from benchmarks.printer import Row
from benchmarks.timing import CopyBandwidth, gbps, median_us

if TYPE_CHECKING:
    from benchmarks.config import Config

PAGE, H, D = 16, 8, 128
MAX_CACHE_BYTES = 24 * 2**30
DECODE = [(B, group, L) for B in (4, 16, 64) for group in (1, 4, 8) for L in (4096, 32768)]


def _paged_cache(B: int, lengths: torch.Tensor, dtype, device, gen) -> Tuple[torch.Tensor, ...]:
    """Pools on shuffled pages holding lengths[b, h] random rows per head, and a page table with room for them."""
    pages = (lengths + PAGE - 1) // PAGE
    M = int(pages.max())
    P = int(pages.sum())
    key_pages = torch.randn(P, PAGE, D, generator=gen, device=device, dtype=dtype)
    value_pages = torch.randn(P, PAGE, D, generator=gen, device=device, dtype=dtype)
    ids = torch.randperm(P, generator=gen, device=device).to(torch.int32)
    table = torch.full((B, H, M), -1, dtype=torch.int32, device=device)
    live = torch.arange(M, device=device).view(1, 1, M) < pages.unsqueeze(-1)
    table[live] = ids
    return key_pages, value_pages, table, lengths.to(torch.int32)


def _check_decode(out, query, key_pages, value_pages, table, lengths) -> str:
    """The op's output against SDPA with GQA on the gathered rows, one batch row at a time."""
    worst = 0.0
    for b in range(query.shape[0]):
        keys, values, live = attngate_ext.gather_pages(key_pages, value_pages, table[b : b + 1], lengths[b : b + 1])
        q = query[b : b + 1].unsqueeze(2)
        mask = live.unsqueeze(2).repeat_interleave(q.shape[1] // H, 1)
        want = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True).squeeze(2)
        worst = max(worst, (out[b : b + 1].float() - want.float()).abs().max().item())
    return "ok" if worst <= 3e-2 else f"MISMATCH max err {worst:.2e}"


def _row(op: str, shape: str, dtype, t_us: float, nbytes: int, copy: CopyBandwidth, check: str, **extra) -> Row:
    bw, copy_bw = gbps(nbytes, t_us), copy.measure(nbytes)
    return Row(section="bandwidth", op=op, shape=shape, dtype=str(dtype).replace("torch.", ""), device="cuda",
               op_us=t_us, ref_us=0.0, speedup=0.0, bytes=nbytes, gbps=bw, copy_gbps=copy_bw,
               pct_copy=100.0 * bw / copy_bw if copy_bw else 0.0, check=check, extra=extra)


def _decode_rows(cfg: "Config", copy: CopyBandwidth, dtype) -> List[Row]:
    rows = []
    es = torch.empty((), dtype=dtype).element_size()
    cases = [(B, g, L, False) for B, g, L in DECODE] + [(16, 4, 32768, True)]
    for B, group, L, ragged in cases:
        if 2 * B * H * L * D * es > MAX_CACHE_BYTES:
            continue
        gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
        if ragged:
            lengths = torch.randint(L // 8, L + 1, (B, H), generator=gen, device=cfg.device)
        else:
            lengths = torch.full((B, H), L, device=cfg.device)
        key_pages, value_pages, table, lengths = _paged_cache(B, lengths, dtype, cfg.device, gen)
        query = torch.randn(B, H * group, D, generator=gen, device=cfg.device, dtype=dtype)
        args = (query, key_pages, value_pages, table, lengths, D**-0.5)
        with attngate_ext.sync_checks(False):
            check = _check_decode(torch.ops.attngate.paged_decode_attention(*args), *args[:5])
            t = median_us(lambda: torch.ops.attngate.paged_decode_attention(*args), cfg.device, cfg.reps,
                          cfg.warmup)
        nbytes = 2 * int(lengths.sum()) * D * es + 2 * B * H * group * D * es
        shape = f"B{B} H{H} g{group} L{'~' if ragged else ''}{L} D{D}"
        rows.append(_row("paged_decode", shape, dtype, t, nbytes, copy, check, ragged=ragged))
        del key_pages, value_pages
    return rows


def _storage_rows(cfg: "Config", copy: CopyBandwidth, dtype) -> List[Row]:
    rows = []
    es = torch.empty((), dtype=dtype).element_size()
    B, T, L = 16, 4096, 32768
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    # Append a half-kept chunk of T rows to heads holding L / 2 rows; the pages for the chunk are on the free stack.
    key_pages, value_pages, table, lengths = _paged_cache(B, torch.full((B, H), L // 2 + T, device=cfg.device),
                                                          dtype, cfg.device, gen)
    first_free = (L // 2) // PAGE
    free_ids = table[:, :, first_free:].reshape(-1)
    free_pages = torch.zeros(key_pages.shape[0], dtype=torch.int32, device=cfg.device)
    free_pages[: free_ids.numel()] = free_ids
    free_count = torch.tensor([free_ids.numel()], dtype=torch.int32, device=cfg.device)
    table[:, :, first_free:] = -1
    lengths.fill_(L // 2)
    key = torch.randn(B, H, T, D, generator=gen, device=cfg.device, dtype=dtype)
    keep = torch.rand(B, H, T, generator=gen, device=cfg.device) < 0.5
    state = [table, lengths, free_pages, free_count]
    state0 = [t.clone() for t in state]

    def restore():
        for t, s in zip(state, state0):
            t.copy_(s)

    with attngate_ext.sync_checks(False):
        t_append = median_us(lambda: torch.ops.attngate.paged_append_kv_(key_pages, value_pages, *state, key, key, keep),
                             cfg.device, cfg.reps, cfg.warmup, setup=restore)
    moved = int(keep.sum())
    rows.append(_row("paged_append", f"B{B} H{H} T{T} keep 0.5 D{D}", dtype, t_append, 2 * 2 * moved * D * es, copy,
                     "ok"))
    # Compaction of full L-row heads, half kept (random flags: almost every row after the first drop moves).
    lengths = torch.full((B, H), L, device=cfg.device)
    key_pages, value_pages, table, lengths = _paged_cache(B, lengths, dtype, cfg.device, gen)
    free_pages = torch.zeros(key_pages.shape[0], dtype=torch.int32, device=cfg.device)
    free_count = torch.zeros(1, dtype=torch.int32, device=cfg.device)
    prune = torch.rand(B, H, L, generator=gen, device=cfg.device) < 0.5
    state = [table, lengths, free_pages, free_count]
    state0 = [t.clone() for t in state]
    with attngate_ext.sync_checks(False):
        t_compact = median_us(lambda: torch.ops.attngate.paged_compact_kv_(key_pages, value_pages, *state, prune),
                              cfg.device, cfg.reps, cfg.warmup, setup=restore)
    moving = int(prune.sum())
    rows.append(_row("paged_compact", f"B{B} H{H} L{L} keep 0.5 D{D}", dtype, t_compact, 2 * 2 * moving * D * es, copy,
                     "ok"))
    return rows


def decode_bandwidth_section(cfg: "Config") -> List[Row]:
    """The section's rows (empty without CUDA: it measures GPU bandwidth only)."""
    if cfg.device.type != "cuda":
        print("\nbandwidth section: CUDA only (skipped)")
        return []
    dtype = torch.bfloat16
    copy = CopyBandwidth(cfg.device, cfg.reps, cfg.warmup)
    print(f"\nbandwidth ({dtype}, page size {PAGE}, H_kv {H}, D {D}): op GB/s against a copy of the same bytes")
    print(f"{'op':14s} {'shape':34s} {'op µs':>10s} {'GB/s':>8s} {'copy GB/s':>10s} {'% copy':>7s}  check")
    rows = _decode_rows(cfg, copy, dtype) + _storage_rows(cfg, copy, dtype)
    for r in rows:
        print(f"{r.op:14s} {r.shape:34s} {r.op_us:10.1f} {r.gbps:8.0f} {r.copy_gbps:10.0f} {r.pct_copy:6.0f}%  {r.check}")
    return rows
