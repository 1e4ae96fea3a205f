"""attngate_ext: Attention-Gate KV-cache eviction (arXiv 2410.12876) as fused PyTorch ops.

Importing the package loads the compiled ``attngate_ext._C`` library, which registers
``torch.ops.attngate.*`` (CPU kernels always, CUDA kernels when built with CUDA).
"""

from __future__ import annotations

from . import _extension

_extension.load()  # loads attngate_ext._C, which registers the ops (clear ImportErrors, see _extension.py)

from .gate import AttentionGate, AttentionGateConfig, GateOutput, default_gate_head_dim
from .ops import (
    append_kv_,
    compact_kv_,
    cuda_kernels_available,
    decode_attention,
    gate_flags,
    gather_pages,
    paged_append_kv_,
    paged_compact_kv_,
    paged_decode_attention,
    paged_decode_step_,
    paged_prefill_attention,
    paged_reference,
    paged_remove_rows_,
    reference,
    set_sync_checks,
    sync_checks,
)

__all__ = [
    "AttentionGate",
    "AttentionGateConfig",
    "AttnGateCache",
    "add_attention_gates",
    "collect_retention",
    "default_gate_head_dim",
    "eviction_loss",
    "gate_config",
    "gate_state_dict",
    "gates",
    "list_pretrained_gates",
    "load_gates",
    "load_pretrained_gates",
    "pretrained_gates",
    "remove_attention_gates",
    "save_gates",
    "GateOutput",
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
__version__ = "0.1.0"

# The model wiring needs `transformers`; it is imported on first use so that engines calling only the ops
# (torch.ops.attngate.*) do not pay for it.
_LAZY = {
    "AttnGateCache": "cache",
    "add_attention_gates": "models.model",
    "collect_retention": "training.losses",
    "eviction_loss": "training.losses",
    "gate_config": "models.model",
    "gate_state_dict": "models.model",
    "gates": "models.model",
    "list_pretrained_gates": "pretrained",
    "load_gates": "models.model",
    "load_pretrained_gates": "pretrained",
    "pretrained_gates": "pretrained",
    "remove_attention_gates": "models.model",
    "save_gates": "models.model",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
