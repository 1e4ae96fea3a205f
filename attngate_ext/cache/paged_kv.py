"""PagedKV: one layer's K/V in pages, every (batch row, head) its own sequence of pages from one pool.

The tensors are the paged ops' layout (:mod:`attngate_ext.ops.paged`): ``key_pages``/``value_pages`` ``(P, S, D)``,
``page_table`` ``(B, H, M)`` int32, ``lengths`` ``(B, H)`` int32 and the device-resident free stack
``free_pages``/``free_count``. Callers never unpack them: every paged op is a method here (``append``,
``decode_step``, ``prefill_attention``, ``compact``, ``remove``, ``gather``). The ops take pages from the stack and
give them back themselves; this class only makes the host decisions, with a :class:`~.free_pages.FreePageBound`:
growing the pool (and the page-table width) ahead of the ops, and shrinking or repacking it.

Growing copies the pool (one layer at a time, so the transient is one layer's pool).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch

from ..ops.paged import (
    gather_pages,
    paged_append_kv_,
    paged_compact_kv_,
    paged_decode_step_,
    paged_prefill_attention,
    paged_remove_rows_,
)
from .free_pages import FreePageBound, ceil_div
from .row_keys import RowKeys

if TYPE_CHECKING:
    from .window import RecentWindow


def _pages(rows: torch.Tensor, page_size: int) -> torch.Tensor:
    return (rows + page_size - 1) // page_size


class PagedKV:
    """Paged keys and values of ``batch`` rows x ``heads`` heads of ``head_dim``, in pages of ``page_size`` rows.

    Args:
        growth: when the pool must grow, it grows by at least this fraction of itself (amortised copies).
        max_headroom: a growth leaves every head room for ``clamp(length / 8, page_size, max_headroom)`` more rows
            (rounded up to pages), so the decode steps between two host syncs grow with the sequence while short
            sequences keep little slack.
    """

    def __init__(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 page_size: int = 16, growth: float = 0.125, max_headroom: int = 256) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.growth = growth
        self.key_pages = torch.zeros(0, page_size, head_dim, dtype=dtype, device=device)
        self.value_pages = torch.zeros_like(self.key_pages)
        self.page_table = torch.full((batch, heads, 0), -1, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(batch, heads, dtype=torch.int32, device=device)
        self.free_pages = torch.zeros(0, dtype=torch.int32, device=device)
        self.free_count = torch.zeros(1, dtype=torch.int32, device=device)
        self.bound = FreePageBound(page_size, batch * heads, max_headroom)
        # With a token budget: every row's eviction key, following the rows through every op (see track_rows).
        self.row_keys: Optional[RowKeys] = None
        self.row_limit: Optional[int] = None

    def track_rows(self, limit: int) -> None:
        """Keeps an eviction key per row (:class:`~.row_keys.RowKeys`) so that :meth:`enforce_limit` can hold every
        head to ``limit`` rows; from now on every append must pass the new rows' keys."""
        if self.row_keys is None:
            self.row_keys = RowKeys(*self.lengths.shape, self.lengths.device)
        self.row_limit = limit

    # ---- sizes ---------------------------------------------------------------------------------------------

    @property
    def state(self) -> Tuple[torch.Tensor, ...]:
        """The six tensors of the paged ops, in their order (pools, table, lengths, free stack)."""
        return (self.key_pages, self.value_pages, self.page_table, self.lengths, self.free_pages, self.free_count)

    @property
    def num_pages(self) -> int:
        return self.key_pages.shape[0]

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of keys plus one page of values."""
        return 2 * self.page_size * self.key_pages.shape[2] * self.key_pages.element_size()

    def pages_used(self) -> int:
        """Pages held by some (row, head) (one host synchronisation)."""
        return int(_pages(self.lengths.long(), self.page_size).sum())

    def free_page_count(self) -> int:
        """Free pages in the pool (one host synchronisation)."""
        return int(self.free_count.item())

    def metadata_bytes(self) -> int:
        """Bytes of the page table, lengths, free stack and (with a token budget) the rows' eviction keys."""
        keys = self.row_keys.nbytes if self.row_keys is not None else 0
        return self.page_table.nbytes + self.lengths.nbytes + self.free_pages.nbytes + self.free_count.nbytes + keys

    # ---- the ops -------------------------------------------------------------------------------------------

    def append(self, key: torch.Tensor, value: torch.Tensor, keep: Optional[torch.Tensor],
               row_keys: Optional[torch.Tensor] = None) -> None:
        """Appends the rows of ``key``/``value`` ``(B, H, T, D)`` whose ``keep`` ``(B, H, T)`` is set (all: None);
        ``row_keys`` ``(B, H, T)``: their eviction keys (needed while rows are tracked)."""
        rows = key.shape[2]
        taken = self._prepare_append(rows, keep)
        paged_append_kv_(*self.state, key, value, keep)
        self._appended(rows, taken)
        if self.row_keys is not None:
            self.row_keys.appended(self.lengths, _needed(row_keys), keep)

    def decode_step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                    valid: Optional[torch.Tensor], ring: "RecentWindow", slot: int, scale: float,
                    new_row_keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One ``paged_decode_step_``: the new token ``key``/``value`` ``(B, H, D)`` with flags ``keep`` ``(B, H)``
        (``valid`` ``(B,)``, None: no padding) goes into slot ``slot`` of ``ring`` (with ``ring.holds_kept`` the kept
        row leaving that slot moves to the pages first, else a kept new token goes to the pages), then ``query``
        ``(B, Hq, D)`` attends over the pages and the visible ring rows. Returns ``(B, Hq, D)``. ``new_row_keys``
        ``(B, H)``: the new token's eviction keys (needed while rows are tracked)."""
        taken = self._prepare_append(1)
        if self.row_keys is not None:  # what the step appends: the kept row leaving the ring slot, or the new token
            if ring.holds_kept:
                moved, moved_keys = ring.keep[:, :, slot].clone(), ring.row_keys[:, :, slot].clone()
            else:
                moved, moved_keys = keep if valid is None else keep & valid.unsqueeze(1), _needed(new_row_keys)
        out = paged_decode_step_(query, *self.state, key, value, keep, valid, ring.keys, ring.values, ring.visible,
                                 slot, scale, ring.keep if ring.holds_kept else None)
        self._appended(1, taken)
        if self.row_keys is not None:
            self.row_keys.appended(self.lengths, moved_keys.unsqueeze(-1), moved.unsqueeze(-1))
            if ring.row_keys is not None:
                ring.row_keys[:, :, slot] = _needed(new_row_keys)
        return out

    def prefill_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                          valid: Optional[torch.Tensor], window: int, scale: float,
                          extra: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """``paged_prefill_attention`` of a chunk over these pages, the chunk itself under the eviction rule and the
        optional ``extra = (keys, values, until)`` rows (the window ring); stores nothing."""
        extra_key, extra_value, extra_until = extra if extra is not None else (None, None, None)
        return paged_prefill_attention(query, *self.state[:4], key, value, keep, valid, window, scale, extra_key,
                                       extra_value, extra_until)

    def compact(self, keep_rows: torch.Tensor) -> None:
        """Drops the rows whose ``keep_rows`` ``(B, H, L >= max(lengths))`` flag is False, keeping the order."""
        paged_compact_kv_(*self.state, keep_rows)
        if self.row_keys is not None:
            self.row_keys.compacted(keep_rows)

    def remove(self, rows: torch.Tensor) -> None:
        """Deletes the rows ``rows`` ``(B, H, K)`` int32 (negative: none) with O(K) moves; order not kept."""
        before = self.lengths.clone() if self.row_keys is not None else None
        paged_remove_rows_(*self.state, rows)
        if self.row_keys is not None:
            self.row_keys.removed(before, rows)

    def enforce_limit(self, most: int) -> None:
        """Removes each head's lowest-keyed rows beyond :attr:`row_limit` (at most ``most`` per head: the rows
        appended since the limit last held), on the device, with no host synchronisation."""
        if self.row_limit is not None and most > 0:
            self.remove(self.row_keys.lowest(self.lengths, self.row_limit, most))

    def gather(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense copies ``(B, H, L, D)`` of every head's rows in order, and the ``(B, H, L)`` live mask."""
        return gather_pages(*self.state[:4])

    # ---- growth, shrinking and repacking (host decisions) ----------------------------------------------------

    def _prepare_append(self, rows: int, keep: Optional[torch.Tensor] = None) -> Optional[int]:
        """Grows what an append of ``rows`` rows per head (those of ``keep``) may need; returns the pages it will
        take when it counted them (a long append), for :meth:`_appended`."""
        self._ensure_table(self.bound.length + rows)
        if self.row_keys is not None:
            self.row_keys.reserve(self.page_table.shape[2] * self.page_size)
        if not self.bound.may_run_out(rows):
            return None
        free = self.bound.synced(self.free_page_count())
        worst = self.bound.pages_for_rows(rows)
        if worst <= free:
            return None
        if rows <= self.page_size:
            self._grow_pool(worst - free + self.bound.headroom_pages())
            return None
        # A long append (a prompt chunk): count the pages it really takes (one more sync), so the pool follows the
        # kept rows, not the chunk.
        lengths = self.lengths.long()
        after = lengths + (keep.sum(dim=2) if keep is not None else rows)
        need = int((_pages(after, self.page_size) - _pages(lengths, self.page_size)).sum())
        if need > free:
            self._grow_pool(need - free + self.bound.headroom_pages())
        return need

    def _appended(self, rows: int, taken: Optional[int]) -> None:
        self.bound.appended(rows, taken)

    def _grow_pool(self, extra: int) -> None:
        """Adds ``extra`` free pages (copies the pool; right after a sync, when the bound is exact)."""
        P, S, D = self.key_pages.shape
        free = self.bound.known
        extra = max(extra, int(P * self.growth))
        keys = self.key_pages.new_zeros(P + extra, S, D)
        values = self.value_pages.new_zeros(P + extra, S, D)
        keys[:P] = self.key_pages
        values[:P] = self.value_pages
        self.key_pages, self.value_pages = keys, values
        stack = torch.empty(P + extra, dtype=torch.int32, device=keys.device)
        stack[:free] = self.free_pages[:free]
        # The new ids go on top, highest first, so that pops hand out low ids first.
        stack[free:free + extra] = torch.arange(P + extra - 1, P - 1, -1, dtype=torch.int32, device=keys.device)
        self.free_pages = stack
        self.free_count.fill_(free + extra)
        self.bound.synced(free + extra)

    def _ensure_table(self, rows_bound: int) -> None:
        M = self.page_table.shape[2]
        need = ceil_div(rows_bound, self.page_size)
        if need <= M:
            return
        width = max(need + 4, M + max(M // 4, 4))  # geometric, never less than 4 pages of room
        table = self.page_table.new_full((*self.page_table.shape[:2], width), -1)
        table[:, :, :M] = self.page_table
        self.page_table = table

    def shrink(self, slack: float = 0.25) -> None:
        """Gives free pages back to the allocator when more than ``slack`` of the pool (and more than the decode
        headroom) is free: the used pages are moved to the front of a smaller pool (one host synchronisation)."""
        lengths = self.lengths.long()
        self.bound.length = int(lengths.max()) if lengths.numel() else 0
        used = int(_pages(lengths, self.page_size).sum())
        if self.num_pages - used <= max(slack * self.num_pages, self.bound.headroom_pages()):
            self.bound.synced(self.free_page_count())
            return
        self._repack(self.page_table, self.lengths)

    def index_batch(self, index: torch.Tensor) -> None:
        """Selects / reorders / repeats batch rows (beam search): every selected row gets its own copy of its
        pages in a new pool (rows may repeat, and pages are never shared)."""
        index = index.to(self.lengths.device)
        self.bound.row_heads = index.numel() * self.page_table.shape[1]
        if self.row_keys is not None:
            self.row_keys.index_batch(index)
        self._repack(self.page_table.index_select(0, index), self.lengths.index_select(0, index))

    def _repack(self, table: torch.Tensor, lengths: torch.Tensor) -> None:
        """A new pool holding the pages ``table``/``lengths`` use, moved to the front in (row, head, page) order,
        plus the decode headroom on the free stack."""
        S, device = self.page_size, table.device
        used = _pages(lengths.long(), S)
        n_used = int(used.sum())
        M = table.shape[2]
        live = torch.arange(M, device=device).view(1, 1, M) < used.unsqueeze(-1)
        old_ids = table[live].long()
        keep_free = self.bound.headroom_pages()
        new_p = n_used + keep_free
        keys = self.key_pages.new_zeros(new_p, S, self.key_pages.shape[2])
        values = torch.zeros_like(keys)
        keys[:n_used] = self.key_pages[old_ids]
        values[:n_used] = self.value_pages[old_ids]
        new_table = torch.full_like(table, -1)
        new_table[live] = torch.arange(n_used, dtype=torch.int32, device=device)
        self.key_pages, self.value_pages, self.page_table, self.lengths = keys, values, new_table, lengths
        self.free_pages = torch.cat([torch.arange(new_p - 1, n_used - 1, -1, dtype=torch.int32, device=device),
                                     torch.zeros(n_used, dtype=torch.int32, device=device)])
        self.free_count.fill_(keep_free)
        self.bound.synced(keep_free)


def _needed(row_keys: Optional[torch.Tensor]) -> torch.Tensor:
    if row_keys is None:
        raise ValueError("the rows of this cache are tracked for a token budget: pass the new rows' eviction keys")
    return row_keys
