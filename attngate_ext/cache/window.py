"""RecentWindow: the protected window of every (batch row, KV head), as a small ring of the last W tokens.

With the eviction rule's window W = ``protect_recent``, query i sees key j when j is kept or ``i - j < W``. Every
token spends its first W positions in this ring (slot ``position % W``), visible to every query, whatever its
flag. When a later token takes its slot, a kept token moves to its head's pages and an evicted one is simply
overwritten: evicted rows leave without any compaction, and a kept row is stored once (in the ring while it is
recent, in the pages after), so the cache holds the window plus the kept tokens older than it.

The ring's storage grows with the tokens seen, up to W slots (a short prompt with a wide window holds its own tokens,
not W slots): slot numbers are always ``position % W``, and before the sequence reaches W they are the positions.

``holds_kept=False`` (a one-slot ring, W = 1) keeps the older arrangement: a kept token goes to the pages when it
is created, and the ring row of a kept token is not visible (its copy in the pages is). With one slot nothing is
duplicated for long. Either way a decode step is one ``paged_decode_step_`` call (``ring_keep=keep`` with
``holds_kept``).
"""

from __future__ import annotations

from typing import Optional

import torch


class RecentWindow:
    """K/V ``(B, H, W, D)``, ``visible`` and ``keep`` ``(B, H, W)`` of the last W sequence slots of every (row, head).

    ``visible``: the slot holds a valid token that queries inside the window see. ``keep``: that token's flag
    (only with ``holds_kept``; it then moves to the pages when its slot is taken). ``keep`` is never set on a slot
    that is not ``visible`` (padding is never kept).
    """

    GROWTH_ROWS = 16  # storage grows by at least this many slots (and a quarter), rounded to a multiple of it

    def __init__(self, batch: int, heads: int, window: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, holds_kept: bool = False) -> None:
        self.window = window
        self.keys = torch.zeros(batch, heads, 0, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.visible = torch.zeros(batch, heads, 0, dtype=torch.bool, device=device)
        self.keep = torch.zeros_like(self.visible)
        self.holds_kept = holds_kept
        # With a token budget (and holds_kept): each slot's eviction key, which goes to the pages with a kept row.
        self.row_keys: Optional[torch.Tensor] = None

    def track_rows(self) -> None:
        """Keeps each slot's eviction key (:mod:`.row_keys`) for the rows that move to tracked pages."""
        if self.row_keys is None:
            self.row_keys = torch.zeros(self.visible.shape, dtype=torch.int64, device=self.visible.device)

    @property
    def size(self) -> int:
        """W, the window: slot numbers are positions modulo W."""
        return self.window

    @property
    def capacity(self) -> int:
        """Slots stored now (at most W)."""
        return self.keys.shape[2]

    def reserve(self, slots: int) -> None:
        """Makes slots ``0 .. slots - 1`` exist (``slots <= W``); grows geometrically, copying the ring once."""
        have = self.capacity
        if slots <= have:
            return
        step = self.GROWTH_ROWS
        grown = max(slots, have + max(step, have // 4))
        grown = min(self.window, -(-grown // step) * step)
        extra = grown - have
        B, H, _, D = self.keys.shape
        self.keys = torch.cat([self.keys, self.keys.new_zeros(B, H, extra, D)], dim=2)
        self.values = torch.cat([self.values, self.values.new_zeros(B, H, extra, D)], dim=2)
        self.visible = torch.cat([self.visible, self.visible.new_zeros(B, H, extra)], dim=2)
        self.keep = torch.cat([self.keep, self.keep.new_zeros(B, H, extra)], dim=2)
        if self.row_keys is not None:
            self.row_keys = torch.cat([self.row_keys, self.row_keys.new_zeros(B, H, extra)], dim=2)

    def reserve_for(self, seen: int, chunk: int) -> None:
        """Reserves the slots a chunk of ``chunk`` tokens starting at sequence slot ``seen`` writes."""
        self.reserve(min(self.window, seen + chunk))

    @property
    def nbytes(self) -> int:
        keys = self.row_keys.nbytes if self.row_keys is not None else 0
        return self.keys.nbytes + self.values.nbytes + self.visible.nbytes + self.keep.nbytes + keys

    def until(self, seen: int, chunk: int) -> torch.Tensor:
        """For a chunk of ``chunk`` tokens starting at sequence slot ``seen``: the last query index of the chunk that
        sees each ring row (``(B, H, W)`` int32, -1 for none), the ``extra_until`` of ``paged_prefill_attention``.

        Slot z holds the token at position p = seen - W + ((z - seen) mod W); query t sees it while
        ``seen + t - p < W``, i.e. ``t <= (z - seen) mod W - 1``, or always when it is kept (``holds_kept``).
        """
        W = self.size
        last = ((torch.arange(self.capacity, device=self.visible.device) - seen) % W - 1).to(torch.int32)
        if self.holds_kept:
            last = torch.where(self.keep, chunk - 1, last)
        return torch.where(self.visible, last, -1)

    def leaving(self, seen: int, chunk: int) -> torch.Tensor:
        """``(B, H, W)``: the kept ring rows whose slots a chunk of ``chunk`` tokens starting at ``seen`` takes
        (they move to the pages)."""
        W = self.size
        slots = (torch.arange(min(chunk, W), device=self.visible.device) + seen) % W
        taken = torch.zeros(self.capacity, dtype=torch.bool, device=self.visible.device)
        taken[slots[slots < self.capacity]] = True
        return self.visible & self.keep & taken

    def write(self, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor,
              seen: int, row_keys: Optional[torch.Tensor] = None) -> None:
        """Stores the last ``min(T, W)`` tokens of a chunk ``key``/``value`` ``(B, H, T, D)`` starting at slot
        ``seen``, with their ``keep`` ``(B, H, T)`` flags where ``valid`` ``(B, T)`` (and their eviction keys
        ``row_keys`` ``(B, H, T)`` while slots are tracked)."""
        T = key.shape[2]
        W = self.size
        self.reserve_for(seen, T)
        first = max(T - W, 0)
        slots = (torch.arange(first, T, device=key.device) + seen) % W
        self.keys[:, :, slots] = key[:, :, first:]
        self.values[:, :, slots] = value[:, :, first:]
        if self.row_keys is not None:
            if row_keys is None:
                raise ValueError("the ring's slots are tracked for a token budget: pass the tokens' eviction keys")
            self.row_keys[:, :, slots] = row_keys[:, :, first:]
        valid = valid[:, first:].unsqueeze(1)
        kept = keep[:, :, first:]
        if self.holds_kept:
            self.visible[:, :, slots] = valid.expand_as(kept)
            self.keep[:, :, slots] = valid & kept
        else:
            self.visible[:, :, slots] = valid & ~kept

    def visible_rows(self, seen: int) -> torch.Tensor:
        """``(B, H)`` ring rows that the next query (sequence slot ``seen``) still sees, or that stay as kept rows.
        The slot ``seen % W`` holds the token at ``seen - W``, which no later query sees unless it is kept."""
        alive = torch.arange(self.capacity, device=self.visible.device) != seen % self.size
        return (self.visible & (alive | self.keep)).sum(dim=2)

    def index_batch(self, index: torch.Tensor) -> None:
        """Selects / reorders / repeats batch rows (beam search)."""
        index = index.to(self.keys.device)
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)
        self.visible = self.visible.index_select(0, index)
        self.keep = self.keep.index_select(0, index)
        if self.row_keys is not None:
            self.row_keys = self.row_keys.index_select(0, index)
