"""GateKV: the gate's own K'/V' of every valid token, and the gate's causal attention over them.

The gate is a small causal attention (docs/design.md, section 1): to score a new token it attends over the K'/V' of
every earlier valid token, so those are cached, paged like the model's K/V (one sequence per (batch row, gate KV
head)), for as long as later tokens are gated. Every valid gate token is kept; nothing is ever evicted here.

A local gate (``AttentionGateConfig.attention_window`` W > 0) attends to the last W sequence slots only: its K'/V'
live in a W-slot ring alone (never in pages), written and read like the model's window with every flag off, so their
cost stops growing with the length.
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
    step writes the new token through (never visible: the new token is in the pages too). For a local gate
    (``attention_window`` W > 0) the ring has W slots and holds the K'/V' alone; the pages stay empty."""

    def __init__(self, batch: int, gate: AttentionGate, dtype: torch.dtype, device: torch.device,
                 page_size: int) -> None:
        heads, head_dim = gate.config.num_kv_heads, gate.config.head_dim
        self.window = gate.config.attention_window
        self.pages = PagedKV(batch, heads, head_dim, dtype, device, page_size=page_size)
        self.ring = RecentWindow(batch, heads, max(self.window, 1), head_dim, dtype, device)

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
        if self.window > 0:
            return self._attend_local(gq, gk, gv, valid, seen, scale)
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

    def _attend_local(self, gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor, valid: Optional[torch.Tensor],
                      seen: int, scale: float) -> torch.Tensor:
        """A local gate: query i sees the valid K'/V' j with ``0 <= i - j < W``, all of them in the W-slot ring."""
        B, heads, T, _ = gk.shape
        none = torch.zeros(B, heads, T, dtype=torch.bool, device=gk.device)
        ring = self.ring
        if T == 1 and seen > 0:
            slot = seen % ring.size
            ring.reserve(slot + 1)
            out = self.pages.decode_step(gq[:, :, 0], gk[:, :, 0], gv[:, :, 0], none[..., 0],
                                         None if valid is None else valid[:, 0], ring, slot, scale, stores=False)
            return out.unsqueeze(2)
        valid = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=gk.device)
        extra = (ring.keys, ring.values, ring.until(seen, T)) if ring.size > 1 and seen > 0 else None
        out = self.pages.prefill_attention(gq, gk, gv, none, valid, ring.size, scale, extra)
        ring.write(gk, gv, none, valid, seen)
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
