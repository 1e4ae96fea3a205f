"""Paged storage section: paged_append_kv_ (prefill and decode), paged_compact_kv_ and paged_remove_rows_.

Each row: median time of the op, of its pure-PyTorch reference (``attngate_ext.ops.paged_reference``) and of the
equivalent rectangle op on a dense ``(B, H, C, D)`` cache holding the same rows (``append_kv_``, ``compact_kv_``;
for ``paged_remove_rows_`` it is ``compact_kv_`` dropping the same rows, the O(length) way to delete them), side
by side; achieved GB/s of the paged op under the bytes model of its case and the measured ``dst.copy_(src)``
bandwidth for as many bytes. Shapes: B = 4 (1 with --quick), H and D from the command line, page size 16,
lengths ~ ``rows`` per head (2048 on CPU, 4096 on CUDA). Every repetition starts from the same page table,
lengths and free stack (restored untimed); the references are timed over at most 3 repetitions (Python loops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

import attngate_ext
from attngate_ext.ops import paged_reference
from benchmarks.config import Config
from benchmarks.printer import Column, Row, Table, bandwidth_columns, timed_columns
from benchmarks.timing import CopyBandwidth, gbps, median_us

OPS = torch.ops.attngate
PAGE_SIZE = 16
REF_REPS = 3
COLUMNS: List[Column] = (timed_columns(19, 27) + [("rect µs", 10, lambda r: f"{r.extra['rect_us']:.1f}"),
                                                   ("paged/rect", 10, lambda r: f"{r.extra['paged_over_rect']:.2f}")]
                         + bandwidth_columns())


@dataclass
class PagedCase:
    op: str
    shape: str
    rect_op: str
    state: List[torch.Tensor]  # key_pages, value_pages, page_table, lengths, free_pages, free_count
    args: tuple
    ref_args: tuple
    rect: Callable[[], object]
    rect_setup: Callable[[], object]
    nbytes: int


def _pages(n: torch.Tensor) -> torch.Tensor:
    return (n + PAGE_SIZE - 1) // PAGE_SIZE


def _make_state(cfg: Config, lengths: torch.Tensor, M: int, spare: int, gen: torch.Generator) -> List[torch.Tensor]:
    """Pages in random order for every head's rows, the rest on the free stack; random pool contents."""
    B, H = lengths.shape
    need = _pages(lengths.long()).flatten().tolist()
    P = sum(need) + spare
    perm = torch.randperm(P, generator=gen)
    table = torch.full((B, H, M), -1, dtype=torch.int32)
    at = 0
    for bh, k in enumerate(need):
        table[bh // H, bh % H, :k] = perm[at : at + k].to(torch.int32)
        at += k
    free = torch.full((P,), -1, dtype=torch.int32)
    free[: P - at] = perm[at:].to(torch.int32)
    shape = (P, PAGE_SIZE, cfg.head_dim)
    pools = [torch.randn(shape, generator=gen).to(cfg.dtype) for _ in range(2)]
    state = pools + [table, lengths.to(torch.int32), free, torch.tensor([P - at], dtype=torch.int32)]
    return [t.to(cfg.device) for t in state]


def _sizes(cfg: Config):
    B = 1 if cfg.quick else 4
    rows = 256 if cfg.quick else (4096 if cfg.device.type == "cuda" else 2048)
    return B, cfg.heads, rows, cfg.head_dim, torch.empty((), dtype=cfg.dtype).element_size()


def _dense(cfg: Config, state: List[torch.Tensor], C: int):
    """The rectangle cache holding the same rows as the paged state (gather_pages, padded to C)."""
    k, v, _ = attngate_ext.gather_pages(state[0], state[1], state[2], state[3])
    pad = C - k.shape[2]
    return [torch.nn.functional.pad(x, (0, 0, 0, pad)).contiguous() for x in (k, v)]


def case_append(cfg: Config, gen: torch.Generator, T: Optional[int] = None) -> PagedCase:
    """T new tokens (kept at cfg.keep_ratio) after ~rows/2 rows per head; T = rows/2 (prefill) or 1 (decode).

    Bytes model: the kept rows of key and value read and written, the flags (1 B each), page table entries
    written and lengths read + written (4 B each).
    """
    B, H, rows, D, es = _sizes(cfg)
    decode = T == 1
    T = T or rows // 2
    start = torch.randint(rows // 4, rows // 2 + 1, (B, H), generator=gen)
    M = (rows + T) // PAGE_SIZE + 2
    state = _make_state(cfg, start, M, B * H * (_pages(torch.tensor(T)).item() + 1), gen)
    key = torch.randn(B, H, T, D, generator=gen).to(cfg.dtype).to(cfg.device)
    value = torch.randn(B, H, T, D, generator=gen).to(cfg.dtype).to(cfg.device)
    keep = (torch.rand(B, H, T, generator=gen) < cfg.keep_ratio).to(cfg.device)
    kept = int(keep.sum())
    C = rows + T
    dense = _dense(cfg, state, C)
    dense_len = state[3].clone()
    new_pages = int((_pages(start + keep.sum(-1).cpu()) - _pages(start)).sum())
    nbytes = 2 * 2 * kept * D * es + B * H * T + 4 * new_pages + 2 * 4 * B * H
    return PagedCase(
        op="paged_append_kv_" + (" decode" if decode else ""),
        shape=f"B{B} H{H} T{T} len{rows // 4}-{rows // 2} D{D} S{PAGE_SIZE}",
        rect_op="append_kv_", state=state, args=(key, value, keep), ref_args=(key, value, keep),
        rect=lambda: OPS.append_kv_.default(dense[0], dense[1], dense_len, key, value, keep),
        rect_setup=lambda: dense_len.copy_(state[3]), nbytes=nbytes)


def case_compact(cfg: Config, gen: torch.Generator) -> PagedCase:
    """Nearly full heads (~rows each), flags kept at cfg.keep_ratio.

    Bytes model: each kept row after its head's first dropped row moves (read + write, key and value); the live
    flags (1 B each) and the used page-table entries (4 B) are read; the freed pages pushed (4 B, table -1 4 B).
    """
    B, H, rows, D, es = _sizes(cfg)
    lengths = rows - torch.randint(0, max(rows // 16, 1), (B, H), generator=gen)
    state = _make_state(cfg, lengths, rows // PAGE_SIZE + 1, 4, gen)
    keep_cpu = torch.rand(B, H, rows, generator=gen) < cfg.keep_ratio
    keep = keep_cpu.to(cfg.device)
    live = torch.arange(rows).view(1, 1, -1) < lengths.unsqueeze(-1)
    prefix = torch.minimum(keep_cpu.float().cumprod(-1).sum(-1).long(), lengths)
    moved = int((keep_cpu & live).sum()) - int(prefix.sum())
    freed = int((_pages(lengths) - _pages((keep_cpu & live).sum(-1))).sum())
    nbytes = 2 * 2 * moved * D * es + int(lengths.sum()) + 4 * int(_pages(lengths).sum()) + 8 * freed
    dense = _dense(cfg, state, rows)
    dense_len = state[3].clone()
    return PagedCase(
        op="paged_compact_kv_", shape=f"B{B} H{H} len~{rows} D{D} S{PAGE_SIZE}", rect_op="compact_kv_", state=state,
        args=(keep,), ref_args=(keep,), rect=lambda: OPS.compact_kv_.default(dense[0], dense[1], dense_len, keep),
        rect_setup=lambda: dense_len.copy_(state[3]), nbytes=nbytes)


def case_remove(cfg: Config, gen: torch.Generator, K: int = 64) -> PagedCase:
    """K random live rows deleted from each nearly full head (~rows each).

    Bytes model: each hole filled by a mover (read + write, key and value), the rows (4 B each), the used
    page-table entries read for the id check (4 B each), freed pages pushed (4 B, table -1 4 B).
    """
    B, H, rows, D, es = _sizes(cfg)
    lengths = rows - torch.randint(0, max(rows // 16, 1), (B, H), generator=gen)
    state = _make_state(cfg, lengths, rows // PAGE_SIZE + 1, 4, gen)
    gone = torch.stack([torch.randperm(int(n), generator=gen)[:K] for n in lengths.flatten()]).view(B, H, K)
    holes = int((gone < (lengths - K).view(B, H, 1)).sum())
    freed = int((_pages(lengths) - _pages(lengths - K)).sum())
    nbytes = 2 * 2 * holes * D * es + 4 * B * H * K + 4 * int(_pages(lengths).sum()) + 8 * freed
    rows_t = gone.to(torch.int32).to(cfg.device)
    keep = torch.ones(B, H, rows, dtype=torch.bool)
    keep.scatter_(2, gone, False)
    keep = keep.to(cfg.device)
    dense = _dense(cfg, state, rows)
    dense_len = state[3].clone()
    return PagedCase(
        op="paged_remove_rows_", shape=f"B{B} H{H} K{K} len~{rows} D{D} S{PAGE_SIZE}", rect_op="compact_kv_",
        state=state, args=(rows_t,), ref_args=(rows_t,),
        rect=lambda: OPS.compact_kv_.default(dense[0], dense[1], dense_len, keep),
        rect_setup=lambda: dense_len.copy_(state[3]), nbytes=nbytes)


def _check(case: PagedCase) -> str:
    """Op and reference once on copies of the state: every tensor must match exactly."""
    got = [t.clone() for t in case.state]
    ref = [t.clone() for t in case.state]
    getattr(OPS, case.op.split()[0]).default(*got, *case.args)
    getattr(paged_reference, case.op.split()[0])(*ref, *case.ref_args)
    names = ["key_pages", "value_pages", "page_table", "lengths", "free_pages", "free_count"]
    bad = [n for n, a, b in zip(names, got, ref) if not torch.equal(a, b)]
    return "ok" if not bad else "MISMATCH " + ",".join(bad)


def paged_storage_section(cfg: Config) -> List[Row]:
    """Times every paged storage op against its reference and the rectangle op; prints its own table."""
    print(f"\npaged storage ops (references timed over {REF_REPS} reps; rect = the rectangle op on the same rows)")
    table = Table(COLUMNS)
    table.print_head()
    copy = CopyBandwidth(cfg.device, cfg.reps, cfg.warmup)
    makers: List[Callable[[torch.Generator], PagedCase]] = [
        lambda g: case_append(cfg, g), lambda g: case_append(cfg, g, T=1), lambda g: case_compact(cfg, g),
        lambda g: case_remove(cfg, g)]
    rows: List[Row] = []
    for make in makers:
        case = make(torch.Generator().manual_seed(cfg.seed))
        initial = [t.clone() for t in case.state]

        def setup(case=case, initial=initial):  # bookkeeping back to the initial state (pool contents may differ)
            for t, t0 in zip(case.state[2:], initial[2:]):
                t.copy_(t0)

        name = case.op.split()[0]
        check = _check(case)
        op_fn = getattr(OPS, name).default
        op_us = median_us(lambda: op_fn(*case.state, *case.args), cfg.device, cfg.reps, cfg.warmup, setup, cfg.flush_l2)
        ref_fn = getattr(paged_reference, name)
        ref_us = median_us(lambda: ref_fn(*case.state, *case.ref_args), cfg.device, min(cfg.ref_reps, REF_REPS),
                           min(cfg.ref_warmup, 1), setup, cfg.flush_l2)
        rect_us = median_us(case.rect, cfg.device, cfg.reps, cfg.warmup, case.rect_setup, cfg.flush_l2)
        op_gbps = gbps(case.nbytes, op_us)
        copy_gbps = copy.measure(case.nbytes)
        row = Row(section="paged", op=case.op, shape=case.shape, dtype=str(cfg.dtype).replace("torch.", ""),
                  device=cfg.device.type, op_us=op_us, ref_us=ref_us, speedup=ref_us / op_us, bytes=case.nbytes,
                  gbps=op_gbps, copy_gbps=copy_gbps, pct_copy=100.0 * op_gbps / copy_gbps, check=check,
                  extra={"rect_op": case.rect_op, "rect_us": rect_us, "paged_over_rect": op_us / rect_us})
        rows.append(row)
        table.print_row(row)
    return rows
