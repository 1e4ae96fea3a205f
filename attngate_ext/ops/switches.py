"""Run-time switches of the ops: the CUDA ops' host read-back of device-side value checks, and whether the
extension was built with its CUDA kernels."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_ops = torch.ops.attngate


def set_sync_checks(enabled: bool) -> bool:
    """Turns the CUDA ops' host read-back of device-side value checks on or off; returns the previous setting.

    Shape, dtype and device checks always run on the host. Checks on *values* that live on the GPU (lengths in
    ``[0, C]``, capacity overflow in :func:`append_kv_`) are evaluated by the kernels, which then write nothing.
    With sync checks on (the default) the op reads that 4-byte status back and raises, costing one host
    synchronisation; with them off, or while a CUDA graph is captured, a failing call is a silent no-op.
    CPU ops always raise.
    """
    return _ops.set_sync_checks(enabled)


@contextlib.contextmanager
def sync_checks(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_sync_checks`."""
    previous = set_sync_checks(enabled)
    try:
        yield
    finally:
        set_sync_checks(previous)


def cuda_kernels_available() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("attngate::gate_flags", "CUDA")
