"""decode_attention against a float64 truth, with PyTorch's own error at the same precision as the tolerance."""

from __future__ import annotations

import pytest
import torch

import attngate_ext

from helpers.checks import check_decode_attention
from helpers.tensors import DTYPES, HEAD_DIMS, randn_strided, random_lengths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("group", [1, 4])
def test_matches_reference(device, dtype, D, group):
    g = torch.Generator().manual_seed(D * group)
    B, H, C = 2, 3, 65
    key_cache = randn_strided((B, H, C, D), dtype, device, generator=g)
    value_cache = randn_strided((B, H, C, D), dtype, device, generator=g)
    query = randn_strided((B, H * group, D), dtype, device, generator=g)
    lengths = random_lengths(B, H, 1, C, device, generator=g)
    check_decode_attention(query, key_cache, value_cache, lengths, D**-0.5)


@pytest.mark.parametrize("C", [1, 2, 129, 4096 + 32])
def test_long_caches(device, C):
    """Long caches take the split-along-length path on CUDA; lengths vary per head."""
    g = torch.Generator().manual_seed(C)
    B, H, D = 1, 2, 128
    key_cache = randn_strided((B, H, C, D), torch.bfloat16, device, generator=g)
    value_cache = randn_strided((B, H, C, D), torch.bfloat16, device, generator=g)
    query = randn_strided((B, 4 * H, D), torch.bfloat16, device, generator=g)
    lengths = torch.tensor([[C, max(1, C // 3)]], dtype=torch.int32, device=device)
    check_decode_attention(query, key_cache, value_cache, lengths, D**-0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(device, dtype):
    g = torch.Generator().manual_seed(1)
    B, H, C, D = 2, 2, 40, 72
    key_cache = randn_strided((B, H, C, D), dtype, device, layout="swap12", generator=g)
    value_cache = randn_strided((B, H, C, D), dtype, device, layout="padded", generator=g)
    query = randn_strided((B, 2 * H, D), dtype, device, layout="padded", generator=g)
    lengths = random_lengths(B, 2 * H, 0, C, device, generator=g)[:, ::2]
    check_decode_attention(query, key_cache, value_cache, lengths, 0.2)


def test_empty_heads_give_zeros(device):
    B, H, C, D = 2, 2, 8, 16
    kc = torch.randn(B, H, C, D, device=device)
    vc = torch.randn(B, H, C, D, device=device)
    lengths = torch.tensor([[0, 3], [8, 0]], dtype=torch.int32, device=device)
    out = check_decode_attention(torch.randn(B, 2 * H, D, device=device), kc, vc, lengths, 0.25)
    assert not bool(out[0, :2].any()) and not bool(out[1, 2:].any())
    assert bool(out[0, 2:].abs().sum() > 0)


def test_capacity_zero(device):
    out = attngate_ext.decode_attention(
        torch.randn(1, 2, 16, device=device), torch.zeros(1, 1, 0, 16, device=device),
        torch.zeros(1, 1, 0, 16, device=device), torch.zeros(1, 1, dtype=torch.int32, device=device), 1.0,
    )
    assert not bool(out.any())


def test_large_scores_are_stable(device):
    """Scores far above exp's range must not overflow (the max is subtracted before exp)."""
    kc = torch.full((1, 1, 4, 16), 30.0, device=device)
    vc = torch.arange(64, dtype=torch.float32, device=device).view(1, 1, 4, 16)
    out = check_decode_attention(torch.full((1, 1, 16), 30.0, device=device), kc, vc, torch.tensor([[4]], dtype=torch.int32, device=device), 1.0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    B, H, C, D = 2, 2, 12, 16
    args = (
        torch.randn(B, 4, D, device=device, dtype=dtype),
        torch.randn(B, H, C, D, device=device, dtype=dtype),
        torch.randn(B, H, C, D, device=device, dtype=dtype),
        torch.randint(0, C + 1, (B, H), dtype=torch.int32, device=device),
        0.25,
    )
    torch.library.opcheck(torch.ops.attngate.decode_attention.default, args)
