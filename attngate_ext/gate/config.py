"""AttentionGateConfig: the hyper-parameters of the Attention-Gates of one model, saved as JSON with the weights."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, Optional


# The gate caches its own K'/V' for every token: h'_kv * d' values each, against H * D for the model's K/V. The
# default width keeps that share at or below GATE_CACHE_SHARE, with at least MIN_GATE_HEAD_DIM dims.
GATE_CACHE_SHARE = 0.03
MIN_GATE_HEAD_DIM = 8


def default_gate_head_dim(model_kv_heads: int, model_head_dim: int, gate_kv_heads: int = 1,
                          share: float = GATE_CACHE_SHARE) -> int:
    """The default gate head_dim d': the gate's K'/V' cache costs ``h'_kv * d' / (H * D)`` of the dense cache.

    d' is the largest multiple of 8 (aligned rows for the kernels' vector loads) with ``h'_kv * d' <= share * H * D``,
    at most the model's head_dim D and never below 8. Examples with h'_kv = 1: SmolLM2-135M (H = 3, D = 64) gets 8
    (4.2%: the floor wins), Llama-3-8B (H = 8, D = 128) 24 (2.3%), Llama-2-7B (H = 32, D = 128) 120 (2.9%).
    """
    if min(model_kv_heads, model_head_dim, gate_kv_heads) < 1:
        raise ValueError(f"model_kv_heads, model_head_dim and gate_kv_heads must be >= 1, got {model_kv_heads}, "
                         f"{model_head_dim} and {gate_kv_heads}")
    widest = int(share * model_kv_heads * model_head_dim / gate_kv_heads) // 8 * 8
    return max(MIN_GATE_HEAD_DIM, min(widest, model_head_dim))


@dataclasses.dataclass
class AttentionGateConfig:
    """Settings of the Attention-Gate and of the eviction rule (docs/design.md, sections 1 and 2).

    Attributes:
        num_heads: query heads h' of the gate's own small attention.
        num_kv_heads: key/value heads h'_kv of that attention (1 = multi-query); must divide ``num_heads``.
        head_dim: head dimension d'; ``None`` means the cheap default of :func:`default_gate_head_dim` (filled in when
            gates are added): the gate's own K'/V' cache then costs at most about 3% of the model's dense cache.
        threshold: tau, a token is kept where its retention probability is ``>= threshold``; in (0, 1).
        sink_tokens: the first ``sink_tokens`` positions are always kept.
        rope: apply rotary position embeddings to the gate's Q'/K'.
        protect_recent: the window w; an evicted token stays visible to the next ``w - 1`` queries (w >= 1).
        decode_gating: gate generated tokens too (otherwise every generated token is kept).
        prefill_chunk: prompt chunk size for chunked prefill; 0 = the whole prompt at once.
        init_bias: initial gate bias b_g; +3 gives p ~ 0.95, so a fresh gate keeps everything.
        attention_window: the gate's own attention sees only the last ``attention_window`` sequence slots (itself
            included); 0 = every earlier token. With a window the cache keeps the gate's K'/V' in a ring of
            ``attention_window`` slots instead of for every token, so their cost stops growing with the length.
    """

    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: Optional[int] = None
    threshold: float = 0.5
    sink_tokens: int = 0
    rope: bool = True
    protect_recent: int = 1
    decode_gating: bool = True
    prefill_chunk: int = 0
    init_bias: float = 3.0
    attention_window: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first bad field."""
        def positive_int(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            low = 0 if allow_zero else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"AttentionGateConfig.{name} must be an integer >= {low}, got {value!r}")

        positive_int("num_heads")
        positive_int("num_kv_heads")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"AttentionGateConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"
            )
        if self.head_dim is not None:
            positive_int("head_dim")
            if self.rope and self.head_dim % 2 != 0:
                raise ValueError(f"AttentionGateConfig.head_dim must be even with rope=True, got {self.head_dim}")
        if not isinstance(self.threshold, (int, float)) or not (0.0 < float(self.threshold) < 1.0):
            raise ValueError(f"AttentionGateConfig.threshold must lie in (0, 1), got {self.threshold!r}")
        positive_int("sink_tokens", allow_zero=True)
        positive_int("protect_recent")
        positive_int("prefill_chunk", allow_zero=True)
        positive_int("attention_window", allow_zero=True)
        for name in ("rope", "decode_gating"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AttentionGateConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.init_bias, (int, float)) or not math.isfinite(self.init_bias):
            raise ValueError(f"AttentionGateConfig.init_bias must be a finite number, got {self.init_bias!r}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "AttentionGateConfig":
        """Builds a config from a dict; unknown keys are an error (they usually mean a version mismatch)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AttentionGateConfig fields: {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "AttentionGateConfig":
        return cls.from_dict(json.loads(text))
