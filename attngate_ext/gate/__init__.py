"""The gate wing: the Attention-Gate module, its config, the eviction rule as masks, and the training attention."""

from .config import AttentionGateConfig
from .gate import AttentionGate, GateOutput

__all__ = ["AttentionGate", "AttentionGateConfig", "GateOutput"]
