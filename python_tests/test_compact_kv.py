"""compact_kv_ against reference.compact_kv_: stable in-place compaction of each head's live rows."""

from __future__ import annotations

import pytest
import torch

import attngate_ext
from attngate_ext import reference

from helpers.devices import sync_if_cuda
from helpers.tensors import DTYPES, HEAD_DIMS, randn_strided, random_lengths, random_mask


def _compact_both_and_compare(key_cache, value_cache, lengths, keep):
    ref = [key_cache.clone(), value_cache.clone(), lengths.clone()]
    reference.compact_kv_(ref[0], ref[1], ref[2], keep)
    ptr = key_cache.data_ptr()
    attngate_ext.compact_kv_(key_cache, value_cache, lengths, keep)
    sync_if_cuda(key_cache.device.type)
    assert key_cache.data_ptr() == ptr  # in place
    assert torch.equal(lengths, ref[2])
    B, H = lengths.shape
    for b in range(B):
        for h in range(H):
            n = int(lengths[b, h])
            assert torch.equal(key_cache[b, h, :n], ref[0][b, h, :n]), (b, h)
            assert torch.equal(value_cache[b, h, :n], ref[1][b, h, :n]), (b, h)
    return lengths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_matches_reference(device, dtype, D):
    g = torch.Generator().manual_seed(D + 1)
    B, H, C = 2, 3, 77
    key_cache = randn_strided((B, H, C, D), dtype, device, generator=g)
    value_cache = randn_strided((B, H, C, D), dtype, device, generator=g)
    lengths = random_lengths(B, H, 0, C, device, generator=g)
    keep = random_mask((B, H, C), 0.5, device, generator=g)
    expected = torch.stack([(keep[b, h, : int(lengths[b, h])]).sum() for b in range(B) for h in range(H)])
    out = _compact_both_and_compare(key_cache, value_cache, lengths, keep)
    assert torch.equal(out.flatten().cpu().long(), expected.cpu())


@pytest.mark.parametrize("C", [1, 2, 129, 4096 + 32])
def test_long_and_odd_sizes(device, C):
    """Sizes that straddle any tile or chunk boundary a kernel may use, including one long head."""
    g = torch.Generator().manual_seed(C)
    B, H, D = 2, 2, 64
    key_cache = randn_strided((B, H, C, D), torch.float16, device, generator=g)
    value_cache = randn_strided((B, H, C, D), torch.float16, device, generator=g)
    lengths = random_lengths(B, H, 0, C, device, generator=g)
    lengths[0, 0] = C
    _compact_both_and_compare(key_cache, value_cache, lengths, random_mask((B, H, C), 0.3, device, generator=g))


@pytest.mark.parametrize("layout", ["padded", "swap12"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(device, dtype, layout):
    g = torch.Generator().manual_seed(4)
    B, H, C, D = 3, 2, 50, 72
    key_cache = randn_strided((B, H, C, D), dtype, device, layout=layout, generator=g)
    value_cache = randn_strided((B, H, C, D), dtype, device, layout=layout, generator=g)
    lengths = random_lengths(B, 2 * H, 0, C, device, generator=g)[:, ::2]
    keep = random_mask((B, H, C + 5), 0.5, device, generator=g, layout="transposed")  # L > C is allowed
    _compact_both_and_compare(key_cache, value_cache, lengths, keep)


@pytest.mark.parametrize("case", ["nothing_kept", "everything_kept", "length_0", "length_C", "L_equals_max_length"])
def test_edge_cases(device, case):
    g = torch.Generator().manual_seed(9)
    B, H, C, D = 2, 3, 33, 16
    key_cache = randn_strided((B, H, C, D), torch.bfloat16, device, generator=g)
    value_cache = randn_strided((B, H, C, D), torch.bfloat16, device, generator=g)
    lengths = random_lengths(B, H, 0, C, device, generator=g)
    L = C
    if case == "length_0":
        lengths.zero_()
    if case == "length_C":
        lengths.fill_(C)
    if case == "L_equals_max_length":
        L = int(lengths.max())
    keep = random_mask((B, H, L), 0.5, device, generator=g)
    if case == "nothing_kept":
        keep.zero_()
    if case == "everything_kept":
        keep.fill_(True)
    before = lengths.clone()
    out = _compact_both_and_compare(key_cache, value_cache, lengths, keep)
    if case == "nothing_kept":
        assert not bool(out.any())
    if case == "everything_kept":
        assert torch.equal(out, before)


def test_compact_then_append_roundtrip(device):
    """Pruning then appending keeps exactly the kept old rows followed by the new ones."""
    g = torch.Generator().manual_seed(2)
    B, H, C, D = 1, 2, 16, 16
    rows = randn_strided((B, H, C, D), torch.float32, device, generator=g)
    kc, vc = rows.clone(), rows.clone()
    lengths = torch.full((B, H), 10, dtype=torch.int32, device=device)
    keep = torch.zeros(B, H, C, dtype=torch.bool, device=device)
    keep[0, 0, [1, 4, 9]] = True
    keep[0, 1, [0]] = True
    attngate_ext.compact_kv_(kc, vc, lengths, keep)
    new = randn_strided((B, H, 2, D), torch.float32, device, generator=g)
    attngate_ext.append_kv_(kc, vc, lengths, new, new)
    assert lengths.tolist() == [[5, 3]]
    assert torch.equal(kc[0, 0, :5], torch.cat([rows[0, 0, [1, 4, 9]], new[0, 0]]))
    assert torch.equal(vc[0, 1, :3], torch.cat([rows[0, 1, [0]], new[0, 1]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    B, H, C, D = 2, 3, 20, 16
    kc = torch.randn(B, H, C, D, device=device, dtype=dtype)
    vc = torch.randn(B, H, C, D, device=device, dtype=dtype)
    lengths = torch.randint(0, C + 1, (B, H), dtype=torch.int32, device=device)
    keep = torch.rand(B, H, C, device=device) > 0.5
    torch.library.opcheck(torch.ops.attngate.compact_kv_.default, (kc, vc, lengths, keep))
