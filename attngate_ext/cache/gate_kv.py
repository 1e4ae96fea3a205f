"""GateKV: the gate's own K'/V' of every valid token, and the gate's causal attention over them.

The gate is a small causal attention (docs/design.md, section 1): to score a new token it attends over the K'/V' of
every earlier valid token, so those are cached, paged like the model's K/V (one sequence per (batch row, gate KV
head)), for as long as later tokens are gated. Every valid gate token is kept; nothing is ever evicted here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..gate.gate import AttentionGate
from .paged_kv import PagedKV
from .window import RecentWindow


class GateKV:
    """The gate K'/V' of one layer: ``pages`` (every valid token) and the one-slot ``ring`` that the fused decode
    step writes the new token through (never visible: the new token is in the pages too)."""

    def __init__(self, batch: int, gate: AttentionGate, dtype: torch.dtype, device: torch.device,
                 page_size: int) -> None:
        heads, head_dim = gate.config.num_kv_heads, gate.config.head_dim
        self.pages = PagedKV(batch, heads, head_dim, dtype, device, page_size=page_size)
        self.ring = RecentWindow(batch, heads, 1, head_dim, dtype, device)

    def attend(self, gate: AttentionGate, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
               valid: Optional[torch.Tensor], seen: int, padded: bool) -> torch.Tensor:
        """The gate's causal attention output ``(B, h', T, d')`` for the new tokens ``x`` ``(B, T, d)`` after ``seen``
        sequence slots, over the cached K'/V' plus themselves; caches their K'/V'.

        ``valid`` ``(B, T)`` is False on padding; it may be None on a decode step only (no padding). ``padded``: the
        call has a padding mask (a prompt without one attends with plain causal SDPA).
        """
        gq, gk, gv = gate.project(x, cos, sin)
        B, heads, T, d = gk.shape
        scale = d**-0.5
        if T == 1 and seen > 0:  # a decode step: every valid gate token is kept
            keep = valid.expand(B, heads) if valid is not None else torch.ones(B, heads, dtype=torch.bool,
                                                                               device=x.device)
            self.ring.reserve(1)
            out = self.pages.decode_step(gq[:, :, 0], gk[:, :, 0], gv[:, :, 0], keep,
                                         None if valid is None else valid[:, 0], self.ring, 0, scale)
            return out.unsqueeze(2)
        keep = valid.unsqueeze(1).expand(B, heads, T)
        if seen == 0 and not padded:  # a prompt without padding: plain causal attention
            out = F.scaled_dot_product_attention(gq, gk, gv, is_causal=True, enable_gqa=gq.shape[1] != heads)
        else:  # every gate token is kept: query t sees the cached rows and the valid chunk tokens up to itself
            out = self.pages.prefill_attention(gq, gk, gv, keep, valid, 1, scale)
        self.pages.append(gk, gv, keep)
        return out

    def held_bytes(self) -> int:
        """Bytes of the pages held by some (row, head), and of the ring (one host synchronisation)."""
        return self.pages.pages_used() * self.pages.page_bytes + self.ring.nbytes

    def free_bytes(self) -> int:
        """Bytes of the pool's free pages (one host synchronisation)."""
        return self.pages.free_page_count() * self.pages.page_bytes

    def index_batch(self, index: torch.Tensor) -> None:
        """Selects / reorders / repeats batch rows (beam search)."""
        self.pages.index_batch(index)
        self.ring.index_batch(index)
