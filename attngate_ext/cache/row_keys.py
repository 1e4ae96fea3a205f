"""RowKeys: an eviction key for every paged row of a layer, kept in the rows' order through every op that moves rows.

A hard token budget (``AttnGateCache(max_tokens_per_head=N)``) drops each head's lowest-scoring rows when the head
would hold more than allowed. The key of a row orders rows by their score (the gate's retention probability, or a
policy's), then by their position (the older goes first among equal scores), in one int64:
``monotone(score as float32 bits) << 31 | position``. The keys live next to the pages, ``(B, H, R)`` in each head's
row order, and follow appends (new rows at the end), ``paged_compact_kv_`` (order kept) and ``paged_remove_rows_``
(the surviving tail rows move into the holes) exactly as the rows do, with no host synchronisation.
"""

from __future__ import annotations

from typing import Optional

import torch

# Positions take the low 31 bits: a sequence longer than this cannot be keyed.
POSITION_BITS = 31
NO_ROW = torch.iinfo(torch.int64).max  # the key of a slot past a head's length: never chosen


def score_keys(scores: torch.Tensor, first_position: int) -> torch.Tensor:
    """Keys ``(B, H, T)`` int64 of ``T`` new tokens at positions ``first_position + t`` with ``scores`` ``(B, H, T)``
    (higher kept longer; ``inf`` last of all)."""
    T = scores.shape[-1]
    if first_position + T >= 1 << POSITION_BITS:
        raise ValueError(f"a token budget orders rows by position, which must stay below 2**{POSITION_BITS}")
    bits = scores.to(torch.float32).contiguous().view(torch.int32).long()
    # IEEE-754 bits as an integer increase with the value for positive floats and decrease for negative ones.
    ordered = torch.where(bits >= 0, bits + (1 << 31), -1 - bits)
    positions = torch.arange(first_position, first_position + T, device=scores.device)
    return (ordered << POSITION_BITS) | positions


class RowKeys:
    """The keys of ``(B, H)`` heads' paged rows, ``keys`` ``(B, H, R)`` (entries past a head's length are stale)."""

    def __init__(self, batch: int, heads: int, device: torch.device) -> None:
        self.keys = torch.full((batch, heads, 0), NO_ROW, dtype=torch.int64, device=device)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes

    def reserve(self, rows: int) -> None:
        """Makes room for ``rows`` rows per head (grows geometrically)."""
        have = self.keys.shape[2]
        if rows <= have:
            return
        grown = max(rows, have + have // 4 + 16)
        extra = self.keys.new_full((*self.keys.shape[:2], grown - have), NO_ROW)
        self.keys = torch.cat([self.keys, extra], dim=2)

    def appended(self, lengths: torch.Tensor, keys: torch.Tensor, flags: Optional[torch.Tensor]) -> None:
        """After an append that left ``lengths`` ``(B, H)``: the rows whose ``flags`` ``(B, H, T)`` are set (all:
        None) were appended in order, with ``keys`` ``(B, H, T)``."""
        flags = torch.ones_like(keys, dtype=torch.bool) if flags is None else flags
        flags = flags.expand_as(keys)
        R = self.keys.shape[2]
        rows = lengths.long().unsqueeze(-1) - flags.sum(dim=-1, keepdim=True) + flags.long().cumsum(-1) - 1
        # Rows not appended write into one extra column that is then cut off.
        padded = torch.cat([self.keys, self.keys.new_full((*self.keys.shape[:2], 1), NO_ROW)], dim=2)
        padded.scatter_(2, torch.where(flags, rows, R), keys)
        self.keys = padded[:, :, :R]

    def compacted(self, keep_rows: torch.Tensor) -> None:
        """After ``paged_compact_kv_`` with ``keep_rows`` ``(B, H, L)``: the kept rows moved up, in order."""
        L = keep_rows.shape[2]
        order = torch.argsort((~keep_rows).to(torch.int8), dim=-1, stable=True)
        self.keys[:, :, :L] = self.keys[:, :, :L].gather(2, order)

    def removed(self, lengths: torch.Tensor, rows: torch.Tensor) -> None:
        """After ``paged_remove_rows_`` removed ``rows`` ``(B, H, K)`` (negative: none) from heads of ``lengths``
        ``(B, H)`` rows (before the removal): the surviving rows of ``[n - r, n)`` moved, in ascending order, into
        the removed rows below ``n - r``, in ascending order."""
        R = self.keys.shape[2]
        index = torch.arange(R, device=rows.device)
        removed = torch.zeros(*rows.shape[:2], R + 1, dtype=torch.bool, device=rows.device)
        removed.scatter_(2, torch.where(rows >= 0, rows.long(), R), True)
        removed = removed[:, :, :R]
        n = lengths.long().unsqueeze(-1)
        m = n - removed.sum(dim=-1, keepdim=True)
        holes = removed & (index < m)
        movers = ~removed & (index >= m) & (index < n)
        # The j-th mover (ascending) fills the j-th hole (ascending).
        mover_at = torch.full((*rows.shape[:2], R + 1), 0, dtype=torch.long, device=rows.device)
        mover_at.scatter_(2, torch.where(movers, movers.long().cumsum(-1) - 1, R), index.expand_as(movers))
        source = torch.where(holes, mover_at.gather(2, (holes.long().cumsum(-1) - 1).clamp(min=0)), index)
        self.keys = self.keys.gather(2, source)

    def lowest(self, lengths: torch.Tensor, limit: int, most: int) -> torch.Tensor:
        """The rows ``(B, H, most)`` int32 to remove so that no head holds more than ``limit`` rows: each head's
        ``lengths - limit`` lowest keys (at most ``most``), -1 elsewhere."""
        R = self.keys.shape[2]
        most = min(most, R)
        live = torch.arange(R, device=lengths.device) < lengths.long().unsqueeze(-1)
        ranked = torch.where(live, self.keys, NO_ROW)
        chosen = torch.topk(ranked, most, dim=-1, largest=False, sorted=True).indices
        excess = (lengths.long() - limit).clamp(min=0).unsqueeze(-1)
        return torch.where(torch.arange(most, device=lengths.device) < excess, chosen, -1).to(torch.int32)

    def index_batch(self, index: torch.Tensor) -> None:
        """Selects / reorders / repeats batch rows (beam search)."""
        self.keys = self.keys.index_select(0, index.to(self.keys.device))
