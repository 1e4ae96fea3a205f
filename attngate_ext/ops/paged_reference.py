"""Pure-PyTorch references of the paged ``torch.ops.attngate`` ops, same names and same semantics.

Written for clarity (Python loops over heads), they are what the tests compare the C++/CUDA kernels against.
Mutating references mutate their arguments in place exactly like the ops, including which page ids are taken
from and given back to the free stack, and in what order. The layout is described in :mod:`attngate_ext.ops.paged`.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .paged import gather_pages
from .reference import soft_cap


def _pages(n: int, page_size: int) -> int:
    return (n + page_size - 1) // page_size


def _row(page_table: torch.Tensor, b: int, h: int, r: int, page_size: int):
    return int(page_table[b, h, r // page_size]), r % page_size


def _check_state(op: str, key_pages: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor,
                 free_count: torch.Tensor) -> int:
    P, S, _ = key_pages.shape
    M = page_table.shape[2]
    if bool(((lengths < 0) | (lengths.long() > M * S)).any()):
        raise RuntimeError(f"{op}: lengths must lie in [0, M * page_size] for every (batch, head); nothing was written")
    free = int(free_count[0])
    if not 0 <= free <= P:
        raise RuntimeError(f"{op}: free_count must lie in [0, P]; nothing was written")
    return free


def _check_ids(op: str, ids: List[int], num_pages: int) -> None:
    if any(not 0 <= i < num_pages for i in ids):
        raise RuntimeError(f"{op}: a page id in page_table or free_pages is outside [0, P); nothing was written")


def _used_ids(page_table: torch.Tensor, lengths: torch.Tensor, page_size: int) -> List[int]:
    B, H, _ = page_table.shape
    return [int(page_table[b, h, i]) for b in range(B) for h in range(H)
            for i in range(_pages(int(lengths[b, h]), page_size))]


def _give_back(page_table: torch.Tensor, free_pages: torch.Tensor, free_count: torch.Tensor,
               old: torch.Tensor, new: torch.Tensor, page_size: int) -> None:
    """Pushes the pages [ceil(new/S), ceil(old/S)) of every head, head by head, onto the free stack; -1 in the table."""
    B, H, _ = page_table.shape
    top = int(free_count[0])
    for b in range(B):
        for h in range(H):
            for i in range(_pages(int(new[b, h]), page_size), _pages(int(old[b, h]), page_size)):
                free_pages[top] = page_table[b, h, i]
                page_table[b, h, i] = -1
                top += 1
    free_count[0] = top


def paged_append_kv_(
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_table: torch.Tensor,
    lengths: torch.Tensor,
    free_pages: torch.Tensor,
    free_count: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: Optional[torch.Tensor],
) -> None:
    """Writes the kept rows of key/value (B, H, T, D), in order, after each head's rows; new pages are popped from
    the top of the free stack, head by head in (b, h) order."""
    op = "paged_append_kv_"
    P, S, _ = key_pages.shape
    B, H, M = page_table.shape
    T = key.shape[2]
    if keep is None:
        keep = torch.ones(B, H, T, dtype=torch.bool, device=key.device)
    free = _check_state(op, key_pages, page_table, lengths, free_count)
    old = lengths.long()
    new = old + keep.sum(dim=2).long()
    if bool((((new + S - 1) // S) > M).any()):
        raise RuntimeError(f"{op}: page table full, a head would need more than M pages; nothing was written")
    need = (new + S - 1) // S - (old + S - 1) // S
    if int(need.sum()) > free:
        raise RuntimeError(f"{op}: out of pages, the append needs more pages than free_count; nothing was written")
    partial = [int(page_table[b, h, int(old[b, h]) // S]) for b in range(B) for h in range(H)
               if new[b, h] > old[b, h] and old[b, h] % S != 0]
    _check_ids(op, partial + [int(free_pages[free - 1 - i]) for i in range(int(need.sum()))], P)
    top = free
    for b in range(B):
        for h in range(H):
            first = _pages(int(old[b, h]), S)
            for i in range(int(need[b, h])):
                top -= 1
                page_table[b, h, first + i] = free_pages[top]
            rows = keep[b, h].nonzero().flatten().tolist()
            for k, t in enumerate(rows):
                page, slot = _row(page_table, b, h, int(old[b, h]) + k, S)
                key_pages[page, slot] = key[b, h, t]
                value_pages[page, slot] = value[b, h, t]
    free_count[0] = top
    lengths.copy_(new.to(lengths.dtype))


def paged_compact_kv_(
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_table: torch.Tensor,
    lengths: torch.Tensor,
    free_pages: torch.Tensor,
    free_count: torch.Tensor,
    keep: torch.Tensor,
) -> None:
    """Moves each head's rows whose keep (B, H, L) is true, in order, to the front; pages past the new length go
    back onto the free stack (head by head, in page order) and their table entries become -1."""
    op = "paged_compact_kv_"
    P, S, _ = key_pages.shape
    B, H, _ = page_table.shape
    free = _check_state(op, key_pages, page_table, lengths, free_count)
    if B * H > 0 and int(lengths.max()) > keep.shape[2]:
        raise RuntimeError(f"{op}: keep must cover every live row (L >= max(lengths)); nothing was written")
    _check_ids(op, _used_ids(page_table, lengths, S), P)
    old = lengths.long().clone()
    kept_rows = [[keep[b, h, : int(old[b, h])].nonzero().flatten().tolist() for h in range(H)] for b in range(B)]
    new = torch.tensor([[len(rows) for rows in row] for row in kept_rows], dtype=torch.long).view(B, H)
    if free + int(((old + S - 1) // S - (new + S - 1) // S).sum()) > P:
        raise RuntimeError(f"{op}: free_pages would overflow (more free pages than P); nothing was written")
    for b in range(B):
        for h in range(H):
            for dst, src in enumerate(kept_rows[b][h]):
                if dst != src:
                    dp, ds = _row(page_table, b, h, dst, S)
                    sp, ss = _row(page_table, b, h, src, S)
                    key_pages[dp, ds] = key_pages[sp, ss]
                    value_pages[dp, ds] = value_pages[sp, ss]
    _give_back(page_table, free_pages, free_count, old, new, S)
    lengths.copy_(new.to(lengths.dtype))


def paged_remove_rows_(
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_table: torch.Tensor,
    lengths: torch.Tensor,
    free_pages: torch.Tensor,
    free_count: torch.Tensor,
    rows: torch.Tensor,
) -> None:
    """Deletes rows[b, h, k] >= 0 (distinct, < lengths[b, h]) of each head: with n rows and r deletions, the rows of
    [n - r, n) that survive move, in ascending order, into the deleted rows below n - r, in ascending order."""
    op = "paged_remove_rows_"
    P, S, _ = key_pages.shape
    B, H, _ = page_table.shape
    free = _check_state(op, key_pages, page_table, lengths, free_count)
    old = lengths.long().clone()
    new = old.clone()
    plans = []
    for b in range(B):
        for h in range(H):
            n = int(old[b, h])
            gone = [int(r) for r in rows[b, h].tolist() if r >= 0]
            if any(r >= n for r in gone) or len(set(gone)) != len(gone):
                raise RuntimeError(f"{op}: rows must be distinct live rows (< lengths) of their head; nothing was "
                                   "written")
            m = n - len(gone)
            holes = sorted(r for r in gone if r < m)
            movers = sorted(set(range(m, n)) - set(gone))
            plans.append((b, h, list(zip(movers, holes))))
            new[b, h] = m
    _check_ids(op, _used_ids(page_table, lengths, S), P)
    if free + int(((old + S - 1) // S - (new + S - 1) // S).sum()) > P:
        raise RuntimeError(f"{op}: free_pages would overflow (more free pages than P); nothing was written")
    for b, h, moves in plans:
        for src, dst in moves:
            dp, ds = _row(page_table, b, h, dst, S)
            sp, ss = _row(page_table, b, h, src, S)
            key_pages[dp, ds] = key_pages[sp, ss]
            value_pages[dp, ds] = value_pages[sp, ss]
    _give_back(page_table, free_pages, free_count, old, new, S)
    lengths.copy_(new.to(lengths.dtype))


def _softmax_rows(scores: torch.Tensor, visible: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax over the visible keys of scores (..., N) times values (..., N, D); zeros where nothing is visible."""
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs @ values


def paged_decode_attention(
    query: torch.Tensor,
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    extra_key: Optional[torch.Tensor] = None,
    extra_value: Optional[torch.Tensor] = None,
    extra_valid: Optional[torch.Tensor] = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Softmax attention of query (B, Hq, D) over each KV head's paged rows and its valid extra rows, in float32
    (scores soft-capped when ``softcap > 0``)."""
    keys, values, live = gather_pages(key_pages, value_pages, page_table, lengths)
    if extra_key is not None:
        B, H, E, _ = extra_key.shape
        valid = extra_valid if extra_valid is not None else torch.ones(B, H, E, dtype=torch.bool,
                                                                       device=extra_key.device)
        keys = torch.cat([keys, extra_key], dim=2)
        values = torch.cat([values, extra_value], dim=2)
        live = torch.cat([live, valid], dim=2)
    group = query.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=1)  # (B, Hq, N, D)
    v = values.float().repeat_interleave(group, dim=1)
    scores = soft_cap(torch.einsum("bqd,bqnd->bqn", query.float(), k) * scale, softcap)
    visible = live.repeat_interleave(group, dim=1)
    out = _softmax_rows(scores.unsqueeze(2), visible.unsqueeze(2), v).squeeze(2)
    return out.to(query.dtype)


def paged_prefill_attention(
    query: torch.Tensor,
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_table: torch.Tensor,
    lengths: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor,
    valid: Optional[torch.Tensor],
    window: int,
    scale: float,
    extra_key: Optional[torch.Tensor] = None,
    extra_value: Optional[torch.Tensor] = None,
    extra_until: Optional[torch.Tensor] = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Query t sees every paged row, extra row e iff extra_until[b, h, e] >= t, and chunk key j iff j == t or
    (j < t, valid[b, j] and (keep[b, h, j] or t - j < window)); float32 softmax, output in the query's dtype."""
    B, Hq, T, _ = query.shape
    H = key.shape[1]
    group = Hq // H
    cached_k, cached_v, live = gather_pages(key_pages, value_pages, page_table, lengths)
    t = torch.arange(T, device=query.device)
    parts_k, parts_v = [cached_k], [cached_v]
    parts_vis = [live.unsqueeze(2).expand(B, H, T, live.shape[2])]
    if extra_key is not None:
        E = extra_key.shape[2]
        until = extra_until if extra_until is not None else torch.full((B, H, E), T, device=query.device)
        parts_k.append(extra_key)
        parts_v.append(extra_value)
        parts_vis.append(until.long().unsqueeze(2) >= t.view(1, 1, T, 1))
    i, j = t.view(-1, 1), t.view(1, -1)
    rule = (j < i) & (keep.unsqueeze(2) | (i - j < window))
    if valid is not None:
        rule = rule & valid.view(B, 1, 1, T)
    parts_k.append(key)
    parts_v.append(value)
    parts_vis.append(rule | (i == j))
    k = torch.cat(parts_k, dim=2).float().repeat_interleave(group, dim=1)
    v = torch.cat(parts_v, dim=2).float().repeat_interleave(group, dim=1)
    visible = torch.cat(parts_vis, dim=3).repeat_interleave(group, dim=1)
    scores = soft_cap(torch.einsum("bqtd,bqnd->bqtn", query.float(), k) * scale, softcap)
    return _softmax_rows(scores, visible, v).to(query.dtype)


def paged_decode_step_(
    query: torch.Tensor,
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_table: torch.Tensor,
    lengths: torch.Tensor,
    free_pages: torch.Tensor,
    free_count: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor,
    valid: Optional[torch.Tensor],
    ring_key: torch.Tensor,
    ring_value: torch.Tensor,
    ring_valid: torch.Tensor,
    slot: int,
    scale: float,
    ring_keep: Optional[torch.Tensor] = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Without ``ring_keep``: paged_append_kv_ of the kept new token and its write into ring slot ``slot``
    (valid & ~keep). With it: paged_append_kv_ of the row leaving the slot where ``ring_keep[:, :, slot]``, then the
    new token's write (valid, and ring_keep = valid & keep). Then paged_decode_attention over the pages and the valid
    ring rows. The whole paged state (every length, every page id the attention will read) is checked before
    anything is written."""
    op = "paged_decode_step_"
    if not 0 <= slot < ring_key.shape[2]:
        raise RuntimeError(f"{op}: slot must lie in [0, W = {ring_key.shape[2]}), got {slot}")
    P, S, _ = key_pages.shape
    if bool(((lengths < 0) | (lengths.long() > page_table.shape[2] * S)).any()):
        raise RuntimeError(f"{op}: lengths must lie in [0, M * page_size] for every (batch, head); nothing was written")
    _check_ids(op, _used_ids(page_table, lengths, S), P)
    row_valid = valid.unsqueeze(1) if valid is not None else torch.ones_like(keep)
    if ring_keep is None:
        paged_append_kv_(key_pages, value_pages, page_table, lengths, free_pages, free_count, key.unsqueeze(2),
                         value.unsqueeze(2), keep.unsqueeze(2))
    else:
        paged_append_kv_(key_pages, value_pages, page_table, lengths, free_pages, free_count,
                         ring_key[:, :, slot : slot + 1].clone(), ring_value[:, :, slot : slot + 1].clone(),
                         ring_keep[:, :, slot : slot + 1].clone())
    ring_key[:, :, slot] = key
    ring_value[:, :, slot] = value
    if ring_keep is None:
        ring_valid[:, :, slot] = row_valid & ~keep
    else:
        ring_valid[:, :, slot] = row_valid.expand_as(keep)
        ring_keep[:, :, slot] = row_valid & keep
    return paged_decode_attention(query, key_pages, value_pages, page_table, lengths, scale, ring_key, ring_value,
                                  ring_valid, softcap)
