"""Helpers of the CUDA-path tests: unaligned tensors, and comparison of the live rows of two caches."""

from __future__ import annotations

import math

import torch


def misaligned_randn(shape, dtype, device, generator=None) -> torch.Tensor:
    """A dense tensor that starts one element into its storage (``torch.empty(n + 1)[1:].view(shape)``), so no row
    is 16-byte aligned: the CUDA kernels take their scalar paths."""
    n = math.prod(shape)
    buf = torch.empty(n + 1, dtype=dtype, device=device)[1:]
    buf.copy_(torch.randn(n, generator=generator).to(dtype))
    out = buf.view(shape)
    assert out.data_ptr() % 16 != 0
    return out


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
