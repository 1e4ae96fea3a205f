"""RecentWindow: the protected window of every (batch row, KV head), as a small ring of the last W tokens.

With the eviction rule's window W = ``protect_recent``, query i sees key j when j is kept or ``i - j < W``. Kept
tokens go to the pages as soon as they are created; an evicted token only has to stay visible to the next W - 1
queries, so it lives in this ring (slot ``position % W``) until a later token overwrites it: evicted rows leave
without any compaction. ``visible`` marks the ring rows that are evicted tokens still inside the window (a kept
token's ring row is not visible: its copy in the pages is).
"""

from __future__ import annotations

import torch


class RecentWindow:
    """K/V ``(B, H, W, D)`` and ``visible`` ``(B, H, W)`` of the last W sequence slots of every (row, head)."""

    def __init__(self, batch: int, heads: int, window: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.keys = torch.zeros(batch, heads, window, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.visible = torch.zeros(batch, heads, window, dtype=torch.bool, device=device)

    @property
    def size(self) -> int:
        """W, the slots of the ring."""
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.visible.nbytes

    def until(self, seen: int) -> torch.Tensor:
        """For a chunk starting at sequence slot ``seen``: the last query index of the chunk that sees each ring row
        (``(B, H, W)`` int32, -1 for none), the ``extra_until`` of ``paged_prefill_attention``.

        Slot z holds the token at position p = seen - W + ((z - seen) mod W); query t sees it while
        ``seen + t - p < W``, i.e. ``t <= (z - seen) mod W - 1``.
        """
        W = self.size
        last = (torch.arange(W, device=self.visible.device) - seen) % W - 1
        return torch.where(self.visible, last.to(torch.int32), -1)

    def write(self, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor,
              seen: int) -> None:
        """Stores the last ``min(T, W)`` tokens of a chunk ``key``/``value`` ``(B, H, T, D)`` starting at slot
        ``seen``, visible where ``valid`` ``(B, T)`` and not ``keep`` ``(B, H, T)``."""
        T = key.shape[2]
        W = self.size
        first = max(T - W, 0)
        slots = (torch.arange(first, T, device=key.device) + seen) % W
        self.keys[:, :, slots] = key[:, :, first:]
        self.values[:, :, slots] = value[:, :, first:]
        self.visible[:, :, slots] = valid[:, first:].unsqueeze(1) & ~keep[:, :, first:]

    def visible_rows(self, seen: int) -> torch.Tensor:
        """``(B, H)`` ring rows that the next query (sequence slot ``seen``) still sees: evicted tokens inside the
        window. The slot ``seen % W`` holds the token at ``seen - W``, which no later query sees."""
        alive = torch.arange(self.size, device=self.visible.device) != seen % self.size
        return (self.visible & alive).sum(dim=2)

    def index_batch(self, index: torch.Tensor) -> None:
        """Selects / reorders / repeats batch rows (beam search)."""
        index = index.to(self.keys.device)
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)
        self.visible = self.visible.index_select(0, index)
