"""PagedKV: one layer's K/V in pages, every (batch row, head) its own sequence of pages from one pool.

The tensors are the paged ops' layout (:mod:`attngate_ext.ops.paged`): ``key_pages``/``value_pages`` ``(P, S, D)``,
``page_table`` ``(B, H, M)`` int32, ``lengths`` ``(B, H)`` int32 and the device-resident free stack
``free_pages``/``free_count``. The ops take pages from the stack and give them back themselves; this class only makes
the host decisions: growing the pool (and the page-table width) ahead of the ops, and shrinking it.

Host synchronisation: the class keeps a lower bound of the free pages (``_free_known``, read back at the last sync,
minus what the appends since could have taken: a head gains at most ``ceil(r / S)`` pages from ``r`` more rows). An
append reads ``free_count`` back only when the bound could run out, and a growth leaves every head room for about an
eighth of its length more, so a decode loop synchronises once every that many steps at most. Growing copies the pool
(one layer at a time, so the transient is one layer's pool).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops.paged import gather_pages, paged_append_kv_, paged_compact_kv_, paged_remove_rows_


def _pages(rows: torch.Tensor, page_size: int) -> torch.Tensor:
    return (rows + page_size - 1) // page_size


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


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
        self.max_headroom = max_headroom
        self.key_pages = torch.zeros(0, page_size, head_dim, dtype=dtype, device=device)
        self.value_pages = torch.zeros_like(self.key_pages)
        self.page_table = torch.full((batch, heads, 0), -1, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(batch, heads, dtype=torch.int32, device=device)
        self.free_pages = torch.zeros(0, dtype=torch.int32, device=device)
        self.free_count = torch.zeros(1, dtype=torch.int32, device=device)
        self._free_known = 0  # free pages at the last read-back
        self._rows_since = 0  # rows per head appended since then (an upper bound for every head)
        self._length_bound = 0  # upper bound of max(lengths)

    # ---- sizes ---------------------------------------------------------------------------------------------

    @property
    def batch(self) -> int:
        return self.page_table.shape[0]

    @property
    def heads(self) -> int:
        return self.page_table.shape[1]

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
        """Bytes of the page table, lengths and free stack."""
        return self.page_table.nbytes + self.lengths.nbytes + self.free_pages.nbytes + self.free_count.nbytes

    # ---- growth and shrinking (host decisions) ---------------------------------------------------------------

    def _sync(self) -> int:
        self._free_known = int(self.free_count.item())
        self._rows_since = 0
        return self._free_known

    def _bound_taken(self, rows: int) -> int:
        """Pages that ``rows`` more rows per head can take, at most."""
        return self.batch * self.heads * _ceil_div(rows, self.page_size)

    def _headroom_pages(self) -> int:
        """Free pages a growth or a shrink leaves: room for ``clamp(length / 8, S, max_headroom)`` rows per head."""
        rows = min(max(self._length_bound // 8, self.page_size), max(self.max_headroom, self.page_size))
        return self._bound_taken(rows)

    def _grow_pool(self, extra: int) -> None:
        """Adds ``extra`` free pages (copies the pool; needs ``_free_known`` exact, i.e. right after ``_sync``)."""
        P, S, D = self.key_pages.shape
        free = self._free_known
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
        self._free_known = free + extra

    def _ensure_table(self, rows_bound: int) -> None:
        M = self.page_table.shape[2]
        need = _ceil_div(rows_bound, self.page_size)
        if need <= M:
            return
        width = max(need + 4, M + max(M // 4, 4))  # geometric, never less than 4 pages of room
        table = self.page_table.new_full((self.batch, self.heads, width), -1)
        table[:, :, :M] = self.page_table
        self.page_table = table

    def _reserve(self, rows: int, keep: Optional[torch.Tensor]) -> Optional[int]:
        """Makes sure appending ``rows`` rows per head (those of ``keep`` ``(B, H, rows)``) cannot run out of pages.

        Reads ``free_count`` back only when the bound could run out; for a long append it then also counts the
        pages the append really takes (one more sync) and returns that number, else None."""
        if self._bound_taken(self._rows_since + rows) <= self._free_known:
            return None
        self._sync()
        worst = self._bound_taken(rows)
        if worst <= self._free_known:
            return None
        headroom = self._headroom_pages()
        if rows <= self.page_size:
            self._grow_pool(worst - self._free_known + headroom)
            return None
        lengths = self.lengths.long()
        after = lengths + (keep.sum(dim=2) if keep is not None else rows)
        need = int((_pages(after, self.page_size) - _pages(lengths, self.page_size)).sum())
        if need > self._free_known:
            self._grow_pool(need - self._free_known + headroom)
        return need

    def shrink(self, slack: float = 0.25) -> None:
        """Gives free pages back to the allocator when more than ``slack`` of the pool (and more than the decode
        headroom) is free: the used pages are moved to the front of a smaller pool (one host synchronisation)."""
        S = self.page_size
        lengths = self.lengths.long()
        self._length_bound = int(lengths.max()) if lengths.numel() else 0
        used = _pages(lengths, S)
        n_used = int(used.sum())
        P = self.num_pages
        keep_free = self._headroom_pages()
        if P - n_used <= max(slack * P, keep_free):
            self._sync()
            return
        M = self.page_table.shape[2]
        live = torch.arange(M, device=lengths.device).view(1, 1, M) < used.unsqueeze(-1)
        old_ids = self.page_table[live].long()  # (n_used,), in (b, h, page) order
        remap = torch.full((P,), -1, dtype=torch.int32, device=lengths.device)
        remap[old_ids] = torch.arange(n_used, dtype=torch.int32, device=lengths.device)
        new_p = n_used + keep_free
        keys = self.key_pages.new_zeros(new_p, S, self.key_pages.shape[2])
        values = torch.zeros_like(keys)
        keys[:n_used] = self.key_pages[old_ids]
        values[:n_used] = self.value_pages[old_ids]
        self.key_pages, self.value_pages = keys, values
        self.page_table = torch.where(live, remap[self.page_table.long().clamp_min(0)], -1).to(torch.int32)
        self.free_pages = torch.arange(new_p - 1, n_used - 1, -1, dtype=torch.int32, device=lengths.device)
        self.free_pages = torch.cat([self.free_pages, self.free_pages.new_zeros(n_used)])
        self.free_count.fill_(keep_free)
        self._free_known, self._rows_since = keep_free, 0

    # ---- the ops -------------------------------------------------------------------------------------------

    def prepare_append(self, rows: int, keep: Optional[torch.Tensor] = None) -> Optional[int]:
        """Grows what an append of ``rows`` rows per head (those of ``keep``) may need; pass the result to
        :meth:`appended` after the op (for ops that append themselves, like ``paged_decode_step_``)."""
        self._ensure_table(self._length_bound + rows)
        return self._reserve(rows, keep)

    def appended(self, rows: int, taken: Optional[int]) -> None:
        """Records that ``rows`` rows per head were appended (``taken``: what :meth:`prepare_append` returned)."""
        self._length_bound += rows
        if taken is None:
            self._rows_since += rows
        else:  # counted exactly: the bound is exact again
            self._free_known -= taken

    def append(self, key: torch.Tensor, value: torch.Tensor, keep: Optional[torch.Tensor]) -> None:
        """Appends the rows of ``key``/``value`` ``(B, H, T, D)`` whose ``keep`` ``(B, H, T)`` is set."""
        rows = key.shape[2]
        taken = self.prepare_append(rows, keep)
        paged_append_kv_(self.key_pages, self.value_pages, self.page_table, self.lengths, self.free_pages,
                         self.free_count, key, value, keep)
        self.appended(rows, taken)

    def compact(self, keep_rows: torch.Tensor) -> None:
        """Drops the rows whose ``keep_rows`` ``(B, H, L >= max(lengths))`` flag is False, keeping the order."""
        paged_compact_kv_(self.key_pages, self.value_pages, self.page_table, self.lengths, self.free_pages,
                          self.free_count, keep_rows)

    def remove_rows(self, rows: torch.Tensor) -> None:
        """Deletes the rows ``rows`` ``(B, H, K)`` int32 (negative: none) with O(K) moves; order not kept."""
        paged_remove_rows_(self.key_pages, self.value_pages, self.page_table, self.lengths, self.free_pages,
                           self.free_count, rows)

    def gather(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense copies ``(B, H, L, D)`` of every head's rows in order, and the ``(B, H, L)`` live mask."""
        return gather_pages(self.key_pages, self.value_pages, self.page_table, self.lengths)

    def index_batch(self, index: torch.Tensor) -> None:
        """Selects / reorders / repeats batch rows (beam search): every selected row gets its own copy of its
        pages in a new pool (rows may repeat, and pages are never shared)."""
        S = self.page_size
        index = index.to(self.lengths.device)
        lengths = self.lengths.index_select(0, index)
        table = self.page_table.index_select(0, index)
        used = _pages(lengths.long(), S)
        n_used = int(used.sum())
        M = table.shape[2]
        live = torch.arange(M, device=table.device).view(1, 1, M) < used.unsqueeze(-1)
        keep_free = self._headroom_pages()
        new_p = n_used + keep_free
        keys = self.key_pages.new_zeros(new_p, S, self.key_pages.shape[2])
        values = torch.zeros_like(keys)
        old_ids = table[live].long()
        keys[:n_used] = self.key_pages[old_ids]
        values[:n_used] = self.value_pages[old_ids]
        new_table = torch.full_like(table, -1)
        new_table[live] = torch.arange(n_used, dtype=torch.int32, device=table.device)
        self.key_pages, self.value_pages, self.page_table, self.lengths = keys, values, new_table, lengths
        self.free_pages = torch.cat([torch.arange(new_p - 1, n_used - 1, -1, dtype=torch.int32, device=table.device),
                                     torch.zeros(n_used, dtype=torch.int32, device=table.device)])
        self.free_count.fill_(keep_free)
        self._free_known, self._rows_since = keep_free, 0
