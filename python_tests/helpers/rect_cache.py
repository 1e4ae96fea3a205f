"""The rectangle cache: its live rows, and the comparison of the live rows of two caches."""

from __future__ import annotations

import torch


def live_mask(lengths: torch.Tensor, capacity: int) -> torch.Tensor:
    """(B, H, C) bool: row c of head (b, h) is live."""
    return torch.arange(capacity, device=lengths.device).view(1, 1, -1) < lengths.unsqueeze(-1).long()


def assert_same_live_rows(got, expected) -> None:
    """got / expected: (key_cache, value_cache, lengths). Lengths equal, and every live row equal bit for bit
    (rows past the lengths are unspecified after a compaction). expected may live on another device."""
    kc, vc, lengths = got
    ekc, evc, elengths = (t.to(kc.device) for t in expected)
    assert torch.equal(lengths, elengths), (lengths, elengths)
    mask = live_mask(lengths, kc.shape[2])
    assert torch.equal(kc[mask], ekc[mask]), "key rows differ"
    assert torch.equal(vc[mask], evc[mask]), "value rows differ"
