"""The ops wing: typed wrappers and fakes of ``torch.ops.attngate.*`` and their pure-PyTorch references."""

from . import reference
from .kernels import (
    append_kv_,
    compact_kv_,
    cuda_kernels_available,
    decode_attention,
    gate_flags,
    set_sync_checks,
    sync_checks,
)

__all__ = [
    "append_kv_",
    "compact_kv_",
    "cuda_kernels_available",
    "decode_attention",
    "gate_flags",
    "reference",
    "set_sync_checks",
    "sync_checks",
]
