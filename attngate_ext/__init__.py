"""attngate_ext: Attention-Gate KV-cache eviction (arXiv 2410.12876) as fused PyTorch ops.

Importing the package loads the compiled ``attngate_ext._C`` library, which registers ``torch.ops.attngate.*``
(CPU kernels always, CUDA kernels when built with CUDA), and their fakes for ``torch.compile``. Every public name is
listed once, in ``_PUBLIC``, with the module that defines it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Dict, List

from . import _extension

_extension.load()  # loads attngate_ext._C, which registers the ops (clear ImportErrors, see _extension.py)

from . import ops  # noqa: E402  (the op wrappers and, for torch.compile, the fake of every op)

__version__ = "0.1.0"

# name -> the module (under attngate_ext) that defines it. Only the ops load with the package: the rest is imported
# on first use, so that engines calling only torch.ops.attngate.* do not pay for transformers.
_PUBLIC: Dict[str, str] = {
    # the ops (torch.ops.attngate.* with docstrings), their references and switches
    "gate_flags": "ops", "append_kv_": "ops", "compact_kv_": "ops", "decode_attention": "ops",
    "paged_append_kv_": "ops", "paged_compact_kv_": "ops", "paged_remove_rows_": "ops",
    "paged_decode_attention": "ops", "paged_prefill_attention": "ops", "paged_decode_step_": "ops",
    "gather_pages": "ops", "reference": "ops", "paged_reference": "ops",
    "set_sync_checks": "ops", "sync_checks": "ops", "cuda_kernels_available": "ops",
    # the gate
    "AttentionGate": "gate", "AttentionGateConfig": "gate", "GateOutput": "gate", "default_gate_head_dim": "gate",
    # the cache
    "AttnGateCache": "cache", "MemoryReport": "cache", "TokenPolicy": "cache",
    # gated Hugging Face models
    "add_attention_gates": "models.model", "remove_attention_gates": "models.model", "gates": "models.model",
    "gate_config": "models.model", "update_gate_config": "models.model",
    "set_cache_options": "models.model", "gate_state_dict": "models.model",
    "save_gates": "models.gate_files", "load_gates": "models.gate_files", "cache_kwarg": "models.decoder",
    "calibrate_gate_threshold": "models.calibration", "calibrate_gate_bias": "models.calibration",
    "randomize_gates": "models.calibration",
    # training
    "eviction_loss": "training.losses", "distillation_loss": "training.losses", "collect_retention": "training.losses",
    # the shipped gates
    "list_pretrained_gates": "pretrained", "pretrained_gates": "pretrained", "load_pretrained_gates": "pretrained",
}
__all__ = list(_PUBLIC)

# `import attngate_ext.reference` / `.paged_reference`: the references under their short names are the modules of
# the ops wing themselves (one module object each, whichever name imports it).
sys.modules[f"{__name__}.reference"] = ops.reference
sys.modules[f"{__name__}.paged_reference"] = ops.paged_reference


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
