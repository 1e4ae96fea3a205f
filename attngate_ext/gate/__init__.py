"""The gate wing: the Attention-Gate module, its config, the eviction rule as masks, and the training attention."""

from .config import AttentionGateConfig, default_gate_head_dim
from .gate import AttentionGate, GateOutput
