"""AttentionGateConfig: the hyper-parameters of the Attention-Gates of one model, saved as JSON with the weights."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, Optional


@dataclasses.dataclass
class AttentionGateConfig:
    """Settings of the Attention-Gate and of the eviction rule (docs/design.md, sections 1 and 2).

    Attributes:
        num_heads: query heads h' of the gate's own small attention.
        num_kv_heads: key/value heads h'_kv of that attention (1 = multi-query); must divide ``num_heads``.
        head_dim: head dimension d'; ``None`` means "the model's head_dim" (filled in when gates are added).
        threshold: tau, a token is kept where its retention probability is ``>= threshold``; in (0, 1).
        sink_tokens: the first ``sink_tokens`` positions are always kept.
        rope: apply rotary position embeddings to the gate's Q'/K'.
        protect_recent: the window w; an evicted token stays visible to the next ``w - 1`` queries (w >= 1).
        decode_gating: gate generated tokens too (otherwise every generated token is kept).
        prefill_chunk: prompt chunk size for chunked prefill; 0 = the whole prompt at once.
        init_bias: initial gate bias b_g; +3 gives p ~ 0.95, so a fresh gate keeps everything.
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
