"""The ops wing: typed wrappers and fakes of ``torch.ops.attngate.*`` and their pure-PyTorch references."""

from . import paged_reference, reference
from .kernels import (
    append_kv_,
    compact_kv_,
    cuda_kernels_available,
    decode_attention,
    gate_flags,
    set_sync_checks,
    sync_checks,
)
from .paged import (
    gather_pages,
    paged_append_kv_,
    paged_compact_kv_,
    paged_decode_attention,
    paged_decode_step_,
    paged_prefill_attention,
    paged_remove_rows_,
)

__all__ = [
    "append_kv_",
    "compact_kv_",
    "cuda_kernels_available",
    "decode_attention",
    "gate_flags",
    "gather_pages",
    "paged_append_kv_",
    "paged_compact_kv_",
    "paged_decode_attention",
    "paged_decode_step_",
    "paged_prefill_attention",
    "paged_reference",
    "paged_remove_rows_",
    "reference",
    "set_sync_checks",
    "sync_checks",
]
