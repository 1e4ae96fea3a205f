"""decode_attention against a float64 truth, with PyTorch's own error at the same precision as the tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attngate_ext
from attngate_ext import reference

from conftest import DTYPES, HEAD_DIMS, random_lengths, randn_strided


def _torch_same_precision(query, key_cache, value_cache, lengths, scale):
    """What plain PyTorch computes at the inputs' precision (SDPA with a length mask)."""
    B, H, C, D = key_cache.shape
    group = query.shape[1] // H
    k = key_cache.repeat_interleave(group, dim=1)
    v = value_cache.repeat_interleave(group, dim=1)
    live = torch.arange(C, device=query.device).view(1, 1, 1, C) < lengths.repeat_interleave(group, 1)[..., None, None]
    out = F.scaled_dot_product_attention(query.unsqueeze(2), k, v, attn_mask=live, scale=scale).squeeze(2)
    return torch.where(lengths.repeat_interleave(group, 1)[..., None] > 0, out, torch.zeros_like(out))


def _check(query, key_cache, value_cache, lengths, scale):
    out = attngate_ext.decode_attention(query, key_cache, value_cache, lengths, scale)
    assert out.dtype == query.dtype and out.shape == query.shape and out.is_contiguous()
    exact = reference.decode_attention(query.double(), key_cache.double(), value_cache.double(), lengths, scale)
    torch_out = _torch_same_precision(query, key_cache, value_cache, lengths, scale)
    torch_err = (torch_out.double() - exact).abs().max().item() if exact.numel() else 0.0
    op_err = (out.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert op_err <= 2 * torch_err + 1e-5, (op_err, torch_err)
    ref = reference.decode_attention(query, key_cache, value_cache, lengths, scale)
    assert ((out.double() - ref.double()).abs().max().item() if ref.numel() else 0.0) <= 2 * torch_err + 1e-5
    return out


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
    _check(query, key_cache, value_cache, lengths, D**-0.5)


@pytest.mark.parametrize("C", [1, 2, 129, 4096 + 32])
def test_long_caches(device, C):
    """Long caches take the split-along-length path on CUDA; lengths vary per head."""
    g = torch.Generator().manual_seed(C)
    B, H, D = 1, 2, 128
    key_cache = randn_strided((B, H, C, D), torch.bfloat16, device, generator=g)
    value_cache = randn_strided((B, H, C, D), torch.bfloat16, device, generator=g)
    query = randn_strided((B, 4 * H, D), torch.bfloat16, device, generator=g)
    lengths = torch.tensor([[C, max(1, C // 3)]], dtype=torch.int32, device=device)
    _check(query, key_cache, value_cache, lengths, D**-0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(device, dtype):
    g = torch.Generator().manual_seed(1)
    B, H, C, D = 2, 2, 40, 72
    key_cache = randn_strided((B, H, C, D), dtype, device, layout="swap12", generator=g)
    value_cache = randn_strided((B, H, C, D), dtype, device, layout="padded", generator=g)
    query = randn_strided((B, 2 * H, D), dtype, device, layout="padded", generator=g)
    lengths = random_lengths(B, 2 * H, 0, C, device, generator=g)[:, ::2]
    _check(query, key_cache, value_cache, lengths, 0.2)


def test_empty_heads_give_zeros(device):
    B, H, C, D = 2, 2, 8, 16
    kc = torch.randn(B, H, C, D, device=device)
    vc = torch.randn(B, H, C, D, device=device)
    lengths = torch.tensor([[0, 3], [8, 0]], dtype=torch.int32, device=device)
    out = _check(torch.randn(B, 2 * H, D, device=device), kc, vc, lengths, 0.25)
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
    out = _check(torch.full((1, 1, 16), 30.0, device=device), kc, vc, torch.tensor([[4]], dtype=torch.int32, device=device), 1.0)
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
