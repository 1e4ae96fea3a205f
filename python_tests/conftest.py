"""Shared fixtures: devices (CUDA twins skip with a reason when no GPU or no CUDA kernels), dtypes, makers."""

from __future__ import annotations

from typing import Optional

import pytest
import torch

import attngate_ext

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [16, 64, 72, 128, 256]


def _cuda_skip_reason() -> Optional[str]:
    if not attngate_ext.cuda_kernels_available():
        return "attngate_ext was built without CUDA kernels"
    if not torch.cuda.is_available():
        return "no CUDA device visible"
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON)))]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


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


def sync_if_cuda(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
