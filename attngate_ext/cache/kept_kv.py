"""The model's K/V in a gated layer: a prefill chunk and a decode step over the pages and the window ring.

The rule (docs/design.md, section 2): query i sees key j when j is kept or ``i - j < w``. Every token spends its
window in the ring (:class:`~.window.RecentWindow`, visible to all); a kept token moves to its head's pages
(:class:`~.paged_kv.PagedKV`) when it leaves the window (w = 1: when it is created), an evicted one is overwritten.
"""

from __future__ import annotations

from typing import Optional

import torch

from .paged_kv import PagedKV
from .window import RecentWindow


def prefill_chunk(pages: PagedKV, ring: RecentWindow, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  keep: torch.Tensor, valid: torch.Tensor, window: int, scale: float, seen: int,
                  row_keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A chunk of new tokens after ``seen`` sequence slots: attends to the pages, the ring and itself under the rule,
    then moves the kept ring rows whose slots the chunk takes to the pages, stores the chunk's kept tokens older
    than the window in the pages and its last ``w`` tokens in the ring. Returns ``(B, Hq, T, D)``. ``row_keys``
    ``(B, H, T)``: the tokens' eviction keys, while the rows are tracked for a token budget."""
    T = key.shape[2]
    extra = None
    if ring.size > 1 and seen > 0:
        extra = (ring.keys, ring.values, ring.until(seen, T))
    out = pages.prefill_attention(query, key, value, keep, valid, window, scale, extra)
    if not ring.holds_kept:
        pages.append(key, value, keep, row_keys)
    else:
        if seen > 0:
            pages.append(ring.keys, ring.values, ring.leaving(seen, T), ring.row_keys)
        older = T - ring.size
        if older > 0:
            pages.append(key[:, :, :older], value[:, :, :older], keep[..., :older],
                         None if row_keys is None else row_keys[..., :older])
    ring.write(key, value, keep, valid, seen, row_keys)
    return out


def decode_step(pages: PagedKV, ring: RecentWindow, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                keep: torch.Tensor, valid: Optional[torch.Tensor], scale: float, seen: int,
                row_keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One new token (``T = 1``; ``valid`` None: no padding) in one fused op: into the window ring, attention over
    the pages and the ring. With w > 1 the kept token leaving the window moves to the pages first and the new token
    waits in the ring with its flag; with w = 1 a kept new token goes to the pages directly."""
    slot = seen % ring.size
    ring.reserve(slot + 1)
    out = pages.decode_step(query[:, :, 0], key[:, :, 0], value[:, :, 0], keep[..., 0],
                            None if valid is None else valid[:, 0], ring, slot, scale,
                            None if row_keys is None else row_keys[..., 0])
    return out.unsqueeze(2)
