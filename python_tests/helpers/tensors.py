"""Tensor makers: random tensors in the layouts the ops must accept, masks, lengths, and the dtypes and head dims the
op tests sweep."""

from __future__ import annotations

import math

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [16, 64, 72, 128, 256]


def randn_strided(shape, dtype, device, layout: str = "contiguous", generator=None) -> torch.Tensor:
    """Random tensor of `shape` with a contiguous last dim; `layout` picks the strides of the other dims.

    * "contiguous": plain row-major.
    * "padded": a slice of a larger buffer (every dim but the last padded), so strides are not the dense ones.
    * "swap12": for 4-D (B, H, N, D) tensors, stored as (B, N, H, D) and viewed back (the NHD layout).
    """
    if layout == "contiguous":
        return torch.randn(shape, dtype=torch.float32, generator=generator).to(dtype=dtype, device=device)
    if layout == "padded":
        big = [s + 2 for s in shape[:-1]] + [shape[-1] + 8]
        buf = torch.randn(big, dtype=torch.float32, generator=generator).to(dtype=dtype, device=device)
        return buf[tuple(slice(1, 1 + s) for s in shape[:-1]) + (slice(0, shape[-1]),)]
    if layout == "swap12":
        assert len(shape) == 4
        b, h, n, d = shape
        buf = torch.randn((b, n, h, d), dtype=torch.float32, generator=generator).to(dtype=dtype, device=device)
        return buf.transpose(1, 2)
    raise ValueError(layout)


def random_mask(shape, keep_ratio: float, device, generator=None, layout: str = "contiguous") -> torch.Tensor:
    """Bool mask with P(True) = keep_ratio; "transposed" layout gives a non-contiguous view."""
    if layout == "transposed":
        m = torch.rand(tuple(reversed(shape)), generator=generator) < keep_ratio
        return m.permute(*reversed(range(len(shape)))).to(device)
    return (torch.rand(shape, generator=generator) < keep_ratio).to(device)


def random_lengths(B: int, H: int, low: int, high: int, device, generator=None) -> torch.Tensor:
    """(B, H) int32 lengths drawn uniformly from [low, high]."""
    return torch.randint(low, high + 1, (B, H), generator=generator, dtype=torch.int32).to(device)


def random_tokens(shape, dtype, device, keep_ratio: float, generator=None):
    """New tokens ``key``, ``value`` of ``shape`` ``(B, H, T, D)`` and their ``keep`` flags ``(B, H, T)``."""
    key = randn_strided(shape, dtype, device, generator=generator)
    value = randn_strided(shape, dtype, device, generator=generator)
    return key, value, random_mask(shape[:-1], keep_ratio, device, generator=generator)


def misaligned_randn(shape, dtype, device, generator=None) -> torch.Tensor:
    """A dense tensor that starts one element into its storage (``torch.empty(n + 1)[1:].view(shape)``), so no row
    is 16-byte aligned: the CUDA kernels take their scalar paths."""
    n = math.prod(shape)
    buf = torch.empty(n + 1, dtype=dtype, device=device)[1:]
    buf.copy_(torch.randn(n, generator=generator).to(dtype))
    out = buf.view(shape)
    assert out.data_ptr() % 16 != 0
    return out
