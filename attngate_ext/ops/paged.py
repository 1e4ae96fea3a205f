"""Typed wrappers and docstrings of the paged ``torch.ops.attngate`` ops (fakes: :mod:`attngate_ext.ops.fakes`;
pure-PyTorch twins: :mod:`attngate_ext.ops.paged_reference`).

Paged layout of one layer (every (batch row, KV head) is its own sequence of fixed-size pages, as a vLLM / FlashInfer
block table with one KV head per sequence):

* ``key_pages``, ``value_pages``: ``(P, S, D)``: P pages of S rows (``page_size``), last dimension contiguous (other
  strides free), float32 / float16 / bfloat16. One pool per layer; a page belongs to at most one (row, head).
* ``page_table``: ``(B, H, M)`` int32. Logical row r of head (b, h) is row ``r % S`` of page
  ``page_table[b, h, r // S]``; entries ``[0, ceil(lengths[b, h] / S))`` are that head's pages, in order. Entries
  past them are never read; the ops that give pages back set the entries they free to -1.
* ``lengths``: ``(B, H)`` int32, the rows of each head.
* ``free_pages``: ``(P,)`` int32 and ``free_count``: ``(1,)`` int32, a stack of free page ids on the device: entries
  ``[0, free_count[0])`` are free. Appends pop pages from the top (head by head in (b, h) order: head 0 gets the
  topmost); compaction and removal push the pages they empty (head by head, in page order).

Every op takes and gives back pages itself, on the device, so a decode step needs no host synchronisation. Value
errors (lengths outside ``[0, M * S]``, out of pages, page table full, a page id outside ``[0, P)``) follow the
rectangle ops' model: nothing is written, CPU ops raise, CUDA ops raise after a 4-byte read-back unless sync checks
are off (see :func:`attngate_ext.set_sync_checks`). Page ids must be distinct across heads and the free stack must
hold only pages no head uses; this is not checked.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

_ops = torch.ops.attngate


def paged_append_kv_(
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_table: torch.Tensor,
    lengths: torch.Tensor,
    free_pages: torch.Tensor,
    free_count: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: Optional[torch.Tensor] = None,
) -> None:
    """Appends new tokens to the paged cache, in place.

    For every (b, h) the rows of ``key``/``value`` ``(B, H, T, D)`` whose ``keep`` ``(B, H, T)`` is true (all rows
    when None) are written, in order, after the head's ``lengths[b, h]`` rows, and ``lengths`` grows by their count.
    A head that fills its last page takes the next page from the top of the free stack. Raises, writing nothing,
    when the free stack or a head's page-table row would run out.
    """
    _ops.paged_append_kv_(key_pages, value_pages, page_table, lengths, free_pages, free_count, key, value, keep)


def paged_compact_kv_(
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_table: torch.Tensor,
    lengths: torch.Tensor,
    free_pages: torch.Tensor,
    free_count: torch.Tensor,
    keep: torch.Tensor,
) -> None:
    """Prunes the paged cache in place with any policy's flags, keeping the order.

    ``keep`` is ``(B, H, L)`` bool with ``L >= max(lengths)``. Each head's rows whose flag is true move, in their
    order, to the front (rows before the first dropped one do not move); ``lengths`` becomes their count and the
    pages that empty go back onto the free stack.
    """
    _ops.paged_compact_kv_(key_pages, value_pages, page_table, lengths, free_pages, free_count, keep)


def paged_remove_rows_(
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    page_table: torch.Tensor,
    lengths: torch.Tensor,
    free_pages: torch.Tensor,
    free_count: torch.Tensor,
    rows: torch.Tensor,
) -> None:
    """Deletes a few rows of each head with O(rows) moves; the order of the rows is not kept.

    ``rows`` is ``(B, H, K)`` int32: the logical rows to delete, negative entries ignored; each must be below the
    head's length and listed once. With n rows and r deletions, the surviving rows of ``[n - r, n)`` move, in
    ascending order, into the deleted rows below ``n - r``, in ascending order; pages that empty go back.
    """
    _ops.paged_remove_rows_(key_pages, value_pages, page_table, lengths, free_pages, free_count, rows)


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
    """Attention of one query token per head over each KV head's paged rows, plus optional dense extra rows.

    ``query`` is ``(B, Hq, D)``, Hq a multiple of H (query head q reads KV head ``q // (Hq // H)``). The keys are the
    head's ``lengths[b, h]`` paged rows and the rows e of ``extra_key``/``extra_value`` ``(B, H, E, D)`` where
    ``extra_valid`` ``(B, H, E)`` is true (all when None). Softmax of ``scale * q.k`` in float32; returns
    ``(B, Hq, D)`` in the query's dtype, zeros for a head with no visible row. ``query`` and the extra rows need a
    contiguous last dimension (other strides free), like the pages. With ``softcap > 0`` every score is
    soft-capped first, ``softcap * tanh(score / softcap)`` (Gemma 2); the other attention ops take it too.
    """
    return _ops.paged_decode_attention(query, key_pages, value_pages, page_table, lengths, scale, extra_key,
                                       extra_value, extra_valid, softcap)


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
    """Attention of a chunk of T new tokens over the paged cache and themselves, under the eviction rule.

    ``query`` ``(B, Hq, T, D)``; ``key``/``value`` ``(B, H, T, D)`` are the chunk's own keys and values, ``keep``
    ``(B, H, T)`` their flags, ``valid`` ``(B, T)`` false on padding (None: no padding). Query t of KV head h sees

    * every paged row of (b, h) (cached rows are kept rows);
    * row e of ``extra_key``/``extra_value`` ``(B, H, E, D)`` iff ``extra_until[b, h, e] >= t`` (int32; the last
      query of the chunk that sees it, -1 for none; all queries when ``extra_until`` is None): earlier tokens still
      inside the protected window;
    * chunk key j iff ``j == t``, or ``j < t`` and ``valid[b, j]`` and (``keep[b, h, j]`` or ``t - j < window``).

    Online softmax in float32 over tiles of pages: no ``T x length`` mask and no copy of the cache are built.
    Returns ``(B, Hq, T, D)`` in the query's dtype. ``query``, ``key``, ``value`` and the extra rows need a contiguous
    last dimension (other strides free), like the pages.
    """
    return _ops.paged_prefill_attention(query, key_pages, value_pages, page_table, lengths, key, value, keep, valid,
                                        window, scale, extra_key, extra_value, extra_until, softcap)


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
    """One fused decode step of a gated layer: store the new token, attend.

    ``key``/``value`` ``(B, H, D)`` is the new token and ``keep`` ``(B, H)`` its flags (``valid`` ``(B,)``: false on
    padding, None for none). Every head writes it into slot ``slot`` of its ring of recent rows
    ``ring_key``/``ring_value`` ``(B, H, W, D)``; then ``query`` ``(B, Hq, D)`` attends over the pages and the ring
    rows where ``ring_valid`` (as :func:`paged_decode_attention`). Returns ``(B, Hq, D)``.

    * Without ``ring_keep``: the kept heads also append the new token to their pages (as :func:`paged_append_kv_`),
      and ``ring_valid[:, :, slot] = valid & ~keep`` (an evicted token stays visible while it is inside the window).
    * With ``ring_keep`` ``(B, H, W)`` bool (the ring holds every token of the window, kept ones until they leave
      it): first the row leaving slot ``slot`` is appended to the pages where ``ring_keep[:, :, slot]`` (which must
      never be set where ``ring_valid`` is not), then the new token takes the slot with
      ``ring_valid[:, :, slot] = valid`` and ``ring_keep[:, :, slot] = valid & keep``.
    """
    return _ops.paged_decode_step_(query, key_pages, value_pages, page_table, lengths, free_pages, free_count, key,
                                   value, keep, valid, ring_key, ring_value, ring_valid, slot, scale, ring_keep,
                                   softcap)


def gather_pages(
    key_pages: torch.Tensor, value_pages: torch.Tensor, page_table: torch.Tensor, lengths: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each head's rows in logical order as dense tensors (a copy; for tests, baselines and debugging).

    Returns ``keys``, ``values`` ``(B, H, L, D)`` with L = ``max(lengths)`` (one host synchronisation) and ``live``
    ``(B, H, L)`` bool; rows past a head's length are zeros.
    """
    B, H, M = page_table.shape
    P, S, D = key_pages.shape
    L = int(lengths.max()) if lengths.numel() else 0
    if L == 0 or P == 0 or M == 0:
        empty = key_pages.new_zeros(B, H, 0, D)
        return empty, empty.clone(), torch.zeros(B, H, 0, dtype=torch.bool, device=key_pages.device)
    rows = torch.arange(L, device=page_table.device)
    live = rows.view(1, 1, L) < lengths.unsqueeze(-1)
    pages = torch.where(live, page_table.long()[:, :, (rows // S).clamp_max(M - 1)], 0)
    slots = (rows % S).expand(B, H, L)
    keys = torch.where(live.unsqueeze(-1), key_pages[pages, slots], 0)
    values = torch.where(live.unsqueeze(-1), value_pages[pages, slots], 0)
    return keys, values, live
