"""The devices the tests run on: the CPU always; CUDA when a GPU and the CUDA kernels are there (CUDA twins skip with
the reason otherwise)."""

from __future__ import annotations

from typing import Optional

import pytest
import torch

import attngate_ext


def _cuda_skip_reason() -> Optional[str]:
    if not attngate_ext.cuda_kernels_available():
        return "attngate_ext was built without CUDA kernels"
    if not torch.cuda.is_available():
        return "no CUDA device visible"
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()
# "cpu" and the CUDA twin, which skips (with the reason) where CUDA_SKIP_REASON is set.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(CUDA_SKIP_REASON is not None,
                                                               reason=str(CUDA_SKIP_REASON)))]


def sync_if_cuda(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
