"""append_kv_ against reference.append_kv_: kept rows land after the live rows, in order, bit for bit."""

from __future__ import annotations

import pytest
import torch

import attngate_ext
from attngate_ext import reference

from helpers.devices import sync_if_cuda
from helpers.tensors import DTYPES, HEAD_DIMS, randn_strided, random_lengths, random_mask, random_tokens


def _run_both(key_cache, value_cache, lengths, key, value, keep):
    """Runs the op and the reference on separate copies; returns both (caches, lengths) after the call."""
    ref = [key_cache.clone(), value_cache.clone(), lengths.clone()]
    reference.append_kv_(ref[0], ref[1], ref[2], key, value, keep)
    attngate_ext.append_kv_(key_cache, value_cache, lengths, key, value, keep)
    sync_if_cuda(key_cache.device.type)
    return (key_cache, value_cache, lengths), tuple(ref)


def _assert_same_live_rows(got, ref):
    """Live rows and lengths equal the reference's; rows past the new lengths kept their old contents."""
    (kc, vc, lengths), (rkc, rvc, rlengths) = got, ref
    assert torch.equal(lengths, rlengths)
    B, H = lengths.shape
    for b in range(B):
        for h in range(H):
            n = int(lengths[b, h])
            assert torch.equal(kc[b, h, :n], rkc[b, h, :n]), (b, h)
            assert torch.equal(vc[b, h, :n], rvc[b, h, :n]), (b, h)
    # Rows past the new lengths were never touched: they still hold the old contents.
    for b in range(B):
        for h in range(H):
            n = int(lengths[b, h])
            assert torch.equal(kc[b, h, n:], rkc[b, h, n:]), (b, h)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_matches_reference(device, dtype, D):
    g = torch.Generator().manual_seed(D)
    B, H, C, T = 2, 3, 40, 17
    key_cache = randn_strided((B, H, C, D), dtype, device, generator=g)
    value_cache = randn_strided((B, H, C, D), dtype, device, generator=g)
    lengths = random_lengths(B, H, 0, C - T, device, generator=g)
    key = randn_strided((B, H, T, D), dtype, device, generator=g)
    value = randn_strided((B, H, T, D), dtype, device, generator=g)
    keep = random_mask((B, H, T), 0.5, device, generator=g)
    before = lengths.clone()
    got, ref = _run_both(key_cache, value_cache, lengths, key, value, keep)
    _assert_same_live_rows(got, ref)
    assert torch.equal(lengths.cpu(), (before + keep.sum(-1)).cpu().to(torch.int32))


@pytest.mark.parametrize("layout", ["padded", "swap12"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(device, dtype, layout):
    g = torch.Generator().manual_seed(3)
    B, H, C, T, D = 3, 2, 64, 31, 72
    key_cache = randn_strided((B, H, C, D), dtype, device, layout=layout, generator=g)
    value_cache = randn_strided((B, H, C, D), dtype, device, layout=layout, generator=g)
    lengths = random_lengths(2 * B, H, 0, C - T, device, generator=g)[::2]  # strided lengths too
    key = randn_strided((B, H, T, D), dtype, device, layout=layout, generator=g)
    value = randn_strided((B, H, T, D), dtype, device, layout=layout, generator=g)
    keep = random_mask((B, H, T), 0.6, device, generator=g, layout="transposed")
    assert not (key_cache.is_contiguous() or key.is_contiguous() or keep.is_contiguous() or lengths.is_contiguous())
    _assert_same_live_rows(*_run_both(key_cache, value_cache, lengths, key, value, keep))


@pytest.mark.parametrize(
    "case", ["keep_none", "nothing_kept", "everything_kept", "T0", "T1", "fill_to_capacity", "empty_heads"]
)
def test_edge_cases(device, case):
    g = torch.Generator().manual_seed(11)
    B, H, C, D = 2, 4, 24, 16
    T = {"T0": 0, "T1": 1}.get(case, 8)
    key_cache = randn_strided((B, H, C, D), torch.float32, device, generator=g)
    value_cache = randn_strided((B, H, C, D), torch.float32, device, generator=g)
    lengths = random_lengths(B, H, 0, C - T, device, generator=g)
    if case == "fill_to_capacity":
        lengths.fill_(C - T)
    if case == "empty_heads":
        lengths.zero_()
    key = randn_strided((B, H, T, D), torch.float32, device, generator=g)
    value = randn_strided((B, H, T, D), torch.float32, device, generator=g)
    keep = {
        "keep_none": None,
        "nothing_kept": torch.zeros(B, H, T, dtype=torch.bool, device=device),
        "everything_kept": torch.ones(B, H, T, dtype=torch.bool, device=device),
    }.get(case, random_mask((B, H, T), 0.5, device, generator=g))
    before = lengths.clone()
    _assert_same_live_rows(*_run_both(key_cache, value_cache, lengths, key, value, keep))
    added = T if keep is None else keep.sum(-1).to(torch.int32)
    assert torch.equal(lengths, before + added)


def test_fill_exactly_to_capacity_then_overflow_raises(device):
    B, H, C, D = 1, 2, 6, 16
    kc = torch.zeros(B, H, C, D, device=device)
    vc = torch.zeros(B, H, C, D, device=device)
    lengths = torch.tensor([[2, 0]], dtype=torch.int32, device=device)
    attngate_ext.append_kv_(kc, vc, lengths, torch.ones(B, H, 4, D, device=device), torch.ones(B, H, 4, D, device=device))
    assert lengths.tolist() == [[6, 4]]
    with pytest.raises(RuntimeError, match="capacity"):
        attngate_ext.append_kv_(kc, vc, lengths, torch.ones(B, H, 1, D, device=device), torch.ones(B, H, 1, D, device=device))


def test_decode_steps_accumulate(device):
    """Many T = 1 appends (the decode pattern) equal one append of the whole sequence."""
    g = torch.Generator().manual_seed(5)
    B, H, C, D, T = 2, 2, 32, 64, 20
    key, value, keep = random_tokens((B, H, T, D), torch.bfloat16, device, 0.5, generator=g)
    step = [torch.zeros(B, H, C, D, dtype=torch.bfloat16, device=device) for _ in range(2)]
    step_len = torch.zeros(B, H, dtype=torch.int32, device=device)
    for t in range(T):
        attngate_ext.append_kv_(step[0], step[1], step_len, key[:, :, t : t + 1], value[:, :, t : t + 1], keep[:, :, t : t + 1])
    whole = [torch.zeros_like(step[0]) for _ in range(2)]
    whole_len = torch.zeros_like(step_len)
    attngate_ext.append_kv_(whole[0], whole[1], whole_len, key, value, keep)
    assert torch.equal(step_len, whole_len)
    assert torch.equal(step[0], whole[0]) and torch.equal(step[1], whole[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    B, H, C, T, D = 2, 3, 32, 5, 16
    kc = torch.randn(B, H, C, D, device=device, dtype=dtype)
    vc = torch.randn(B, H, C, D, device=device, dtype=dtype)
    lengths = torch.randint(0, 8, (B, H), dtype=torch.int32, device=device)
    key = torch.randn(B, H, T, D, device=device, dtype=dtype)
    value = torch.randn(B, H, T, D, device=device, dtype=dtype)
    keep = torch.rand(B, H, T, device=device) > 0.5
    torch.library.opcheck(torch.ops.attngate.append_kv_.default, (kc, vc, lengths, key, value, keep))
    torch.library.opcheck(torch.ops.attngate.append_kv_.default, (kc, vc, lengths, key, value, None))
