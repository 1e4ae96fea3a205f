"""Written tensors whose rows share memory are refused with the argument's name; disjoint strided layouts
(including ones ATen's overlap test cannot classify) are accepted and give the reference's result."""

from __future__ import annotations

import pytest
import torch

import attngate_ext
from attngate_ext import reference

B, H, C, D = 2, 2, 8, 16


def _lengths(device):
    return torch.tensor([[3, 8], [0, 5]], dtype=torch.int32, device=device)


def _keep(device):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(B, H, C, generator=g) < 0.5).to(device)


def _compact_matches_reference(kc, vc, lengths, keep):
    """Runs compact_kv_ on (kc, vc) in place and checks the live rows against the reference on dense copies."""
    ref = [kc.clone(), vc.clone(), lengths.clone()]
    reference.compact_kv_(ref[0], ref[1], ref[2], keep)
    attngate_ext.compact_kv_(kc, vc, lengths, keep)
    assert torch.equal(lengths, ref[2])
    for b in range(B):
        for h in range(H):
            n = int(lengths[b, h])
            assert torch.equal(kc[b, h, :n], ref[0][b, h, :n]) and torch.equal(vc[b, h, :n], ref[1][b, h, :n])


def _strided(device, size, stride, numel):
    return torch.randn(numel, device=device).as_strided(size, stride)


# (description, key_cache maker) of caches whose rows overlap; ATen's has_internal_overlap says "too hard" for all
# but the expand()ed one.
OVERLAPPING = [
    ("rows overlap by half a row", lambda dev: _strided(dev, (B, H, C, D), (H * C * D // 2, C * D // 2, D // 2, 1), 4096)),
    ("heads share rows", lambda dev: _strided(dev, (B, H, C, D), (2 * C * D, D, D, 1), 4096)),
    ("batch rows alias", lambda dev: _strided(dev, (B, H, C, D), (D, C * D + D, D, 1), 4096)),
    ("expanded", lambda dev: torch.randn(B, 1, C, D, device=dev).expand(B, H, C, D)),
]


@pytest.mark.parametrize("op", ["append_kv_", "compact_kv_"])
@pytest.mark.parametrize("which", ["key_cache", "value_cache"])
@pytest.mark.parametrize("desc,make", OVERLAPPING, ids=[o[0] for o in OVERLAPPING])
def test_overlapping_cache_rows_are_refused(device, op, which, desc, make):
    caches = {"key_cache": torch.randn(B, H, C, D, device=device), "value_cache": torch.randn(B, H, C, D, device=device)}
    caches[which] = make(device)
    lengths = _lengths(device)
    before = [t.clone() for t in (caches["key_cache"], caches["value_cache"], lengths)]
    with pytest.raises(RuntimeError, match=f"{which} must not have internal overlap: two of its rows share memory"):
        if op == "append_kv_":
            new = torch.randn(B, H, 1, D, device=device)
            attngate_ext.append_kv_(caches["key_cache"], caches["value_cache"], lengths, new, new)
        else:
            attngate_ext.compact_kv_(caches["key_cache"], caches["value_cache"], lengths, _keep(device))
    for t, old in zip((caches["key_cache"], caches["value_cache"], lengths), before):
        assert torch.equal(t, old)


def test_overlapping_lengths_are_refused(device):
    lengths = torch.zeros(4, dtype=torch.int32, device=device).as_strided((B, H), (1, 1))
    with pytest.raises(RuntimeError, match="lengths must not have internal overlap"):
        attngate_ext.compact_kv_(torch.randn(B, H, C, D, device=device), torch.randn(B, H, C, D, device=device),
                                 lengths, _keep(device))


@pytest.mark.parametrize("shift_rows", [0, 3])
def test_key_and_value_cache_sharing_rows_are_refused(device, shift_rows):
    buf = torch.randn(B * H * C * D + shift_rows * D, device=device)
    kc = buf[: B * H * C * D].view(B, H, C, D)
    vc = buf[shift_rows * D :].view(B, H, C, D)
    with pytest.raises(RuntimeError, match="key_cache and value_cache must not share memory"):
        attngate_ext.compact_kv_(kc, vc, _lengths(device), _keep(device))


def test_new_rows_aliasing_the_cache_are_refused(device):
    kc, vc = torch.randn(B, H, C, D, device=device), torch.randn(B, H, C, D, device=device)
    with pytest.raises(RuntimeError, match="value_cache and key must not share memory"):
        attngate_ext.append_kv_(kc, vc, _lengths(device).clamp(max=4), vc[:, :, 5:7], torch.randn(B, H, 2, D, device=device))


def test_interleaved_disjoint_rows_are_accepted(device):
    """Strides that interleave the heads of two batch rows (no nesting) but never share a row."""
    # Row (b, h, c) starts at (3 b + 2 h + 6 c) * D: b, h in {0, 1} give {0, 2, 3, 5}, distinct modulo 6.
    kc = _strided(device, (B, H, C, D), (3 * D, 2 * D, 6 * D, 1), 6 * C * D)
    vc = _strided(device, (B, H, C, D), (3 * D, 2 * D, 6 * D, 1), 6 * C * D)
    _compact_matches_reference(kc, vc, _lengths(device), _keep(device))


def test_fused_kv_buffer_is_accepted(device):
    """K and V rows interleaved in one (B, H, C, 2, D) buffer share a storage but no row."""
    kv = torch.randn(B, H, C, 2, D, device=device)
    _compact_matches_reference(kv[..., 0, :], kv[..., 1, :], _lengths(device), _keep(device))


def test_expanded_new_rows_are_accepted(device):
    """Inputs are only read: an expand()ed key is fine."""
    kc, vc = torch.zeros(B, H, C, D, device=device), torch.zeros(B, H, C, D, device=device)
    key = torch.randn(1, 1, 1, D, device=device).expand(B, H, 3, D)
    lengths = torch.zeros(B, H, dtype=torch.int32, device=device)
    attngate_ext.append_kv_(kc, vc, lengths, key, key)
    assert torch.equal(kc[:, :, :3], key) and torch.equal(vc[:, :, :3], key) and bool((lengths == 3).all())
