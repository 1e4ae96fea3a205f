"""VarLenKV: one layer's per-(batch, head) variable-length K/V storage in the core ops' layout, with capacity."""

from __future__ import annotations

from typing import Optional

import torch

from ..ops.kernels import append_kv_, compact_kv_


class VarLenKV:
    """Keys and values ``(B, H, C, D)`` with int32 ``lengths`` ``(B, H)``; rows ``[0, lengths)`` are live.

    The capacity C grows geometrically (by ``growth`` of itself, 1/32 by default so that at most ~3% of the rows
    are slack, at least ``min_growth`` rows) when an append
    could overflow, and :meth:`trim` shrinks it to the longest head so freed rows go back to the allocator. To
    avoid a host synchronisation per step, the class tracks ``max_length_bound``, an upper bound of
    ``lengths.max()`` that only a growth or a trim refreshes with a real read-back.
    """

    def __init__(
        self,
        batch: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        growth: float = 1.0 / 32,
        min_growth: int = 16,
    ) -> None:
        self.keys = torch.empty(batch, heads, 0, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.lengths = torch.zeros(batch, heads, dtype=torch.int32, device=device)
        self.max_length_bound = 0
        self.growth = growth
        self.min_growth = min_growth

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held: keys and values at full capacity, and the lengths."""
        return self.keys.nbytes + self.values.nbytes + self.lengths.nbytes

    @property
    def used_rows(self) -> int:
        """Rows ``[0, used_rows)`` cover every live row (an upper bound, no synchronisation)."""
        return min(self.max_length_bound, self.capacity)

    def refresh_bound(self) -> int:
        """Reads ``lengths.max()`` back (one host synchronisation) and makes it the bound."""
        self.max_length_bound = int(self.lengths.max().item()) if self.lengths.numel() else 0
        return self.max_length_bound

    def _resize(self, capacity: int) -> None:
        B, H, _, D = self.keys.shape
        keep = min(self.capacity, capacity)
        # Zero-filled: attention over a padded view multiplies unused rows by zero weights, so they must be finite.
        keys = self.keys.new_zeros(B, H, capacity, D)
        values = self.values.new_zeros(B, H, capacity, D)
        keys[:, :, :keep] = self.keys[:, :, :keep]
        values[:, :, :keep] = self.values[:, :, :keep]
        self.keys, self.values = keys, values

    def reserve(self, new_rows: int, growth: Optional[float] = None) -> None:
        """Makes room for ``new_rows`` more rows in every head, growing by ``growth`` (default ``self.growth``) of
        the capacity, at least ``min_growth`` rows, when needed."""
        needed = self.max_length_bound + new_rows
        if needed <= self.capacity:
            return
        # Out of room by the bound: read the real lengths back (evictions leave room the bound does not see).
        # Grow unless that leaves at least ``min_growth`` free rows, so a decode loop synchronises at most once
        # every ``min_growth`` steps instead of once per step when the cache is nearly full.
        needed = self.refresh_bound() + new_rows
        if needed + self.min_growth <= self.capacity:
            return
        grown = self.capacity + max(int(self.capacity * (self.growth if growth is None else growth)), self.min_growth)
        self._resize(max(needed, grown))

    def trim(self) -> None:
        """Shrinks the capacity to the longest head."""
        self._resize(self.refresh_bound())

    def append(self, key: torch.Tensor, value: torch.Tensor, keep: Optional[torch.Tensor]) -> None:
        """Appends the rows of ``key``/``value`` ``(B, H, T, D)`` whose ``keep`` ``(B, H, T)`` is set."""
        T = key.shape[2]
        self.reserve(T)
        append_kv_(self.keys, self.values, self.lengths, key, value, keep)
        self.max_length_bound += T

    def compact(self, keep_rows: torch.Tensor) -> None:
        """Drops the live rows whose ``keep_rows`` ``(B, H, C)`` flag is False, in place."""
        compact_kv_(self.keys, self.values, self.lengths, keep_rows)

    def index_batch(self, index: torch.Tensor) -> None:
        """Reorders / selects / repeats batch rows (beam search)."""
        index = index.to(self.keys.device)
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
