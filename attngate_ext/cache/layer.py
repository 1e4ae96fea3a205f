"""AttnGateLayer: one decoder layer of an AttnGateCache, as a ``transformers`` cache layer.

The gated attention calls :meth:`AttnGateLayer.attend`, which scores each chunk (the gate, or a
:class:`~.policy.TokenPolicy`), attends and stores what stays; the generic ``Cache.update`` path of ungated
attention is refused.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Tuple

import torch
from transformers.cache_utils import CacheLayerMixin

from ..gate.gate import AttentionGate
from ..ops.switches import sync_checks
from . import kept_kv
from .gate_kv import GateKV
from .paged_kv import PagedKV
from .policy import TokenPolicy
from .row_keys import score_keys
from .window import RecentWindow

Attended = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # output (B, Hq, T, D), probs and keep (B, H, T)


class AttnGateLayer(CacheLayerMixin):
    """One decoder layer of an :class:`~attngate_ext.AttnGateCache`.

    State:
        kv: the model's kept K/V, :class:`PagedKV` over ``(B, H)``: a token whose flag is on goes to its head's
            pages when it leaves the window (w = 1: when it is created), and stays.
        window: :class:`RecentWindow`, the last ``w = protect_recent`` tokens of every head, visible to every query
            inside the window; when a token leaves it, it moves to the pages if kept, else its ring slot is simply
            overwritten. A kept token is thus stored once, and the cache holds the window plus the older kept rows.
        gate_kv: :class:`GateKV`, the gate's own K'/V' of every valid token while later tokens are gated (None after
            a prompt when generated tokens are not scored).
        seen: sequence slots processed, padding included (what ``get_seq_length`` reports, so positions stay right).
        valid_count ``(B,)``: valid (non-padding) tokens seen, for the retention statistics.
        max_tokens_per_head: the hard budget N, or None: after every chunk and decode step each head holds at most
            N rows of the model's K/V (its window ring of w slots and at most ``N - w`` paged rows); the rows with
            the lowest score (the gate's retention probability, sinks last; a policy's score when a policy
            decides; the older first among equals) go with ``paged_remove_rows_``.
    """

    def __init__(self, page_size: int = 16, max_tokens_per_head: Optional[int] = None) -> None:  # noqa: D107
        # (CacheLayerMixin.__init__ would set keys/values)
        self.page_size = page_size
        self.max_tokens_per_head = max_tokens_per_head
        self.is_initialized = False
        self.kv: Optional[PagedKV] = None
        self.window: Optional[RecentWindow] = None
        self.gate_kv: Optional[GateKV] = None
        self.valid_count: Optional[torch.Tensor] = None
        self.seen = 0

    # ---- the transformers cache layer interface ---------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError("AttnGateLayer is initialised by the gated attention, not by Cache.update")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        raise RuntimeError(
            "AttnGateCache is filled by gated attention layers; this attention layer is not gated. "
            "Call attngate_ext.add_attention_gates(model) first, or use a DynamicCache for an ungated model."
        )

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 5.20 name
        return -1

    def reset(self) -> None:
        self.__init__(self.page_size, self.max_tokens_per_head)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        for store in (self.kv, self.window, self.gate_kv):
            if store is not None:
                store.index_batch(indices)
        self.valid_count = self.valid_count.index_select(0, indices.to(self.valid_count.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            batch = self.valid_count.shape[0]
            self.batch_select_indices(torch.arange(batch, device=self.valid_count.device).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "AttnGateCache cannot be cropped: evicted tokens are gone. Assisted/speculative decoding is not supported "
            "on a gated model."
        )

    def offload(self) -> None:
        raise NotImplementedError("AttnGateCache does not support offloading")

    def prefetch(self) -> None:
        raise NotImplementedError("AttnGateCache does not support offloading")

    @property
    def batch_size(self) -> int:
        return self.valid_count.shape[0] if self.valid_count is not None else -1

    # ---- the gated attention step -----------------------------------------------------------------------------

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gate_input: torch.Tensor,
               gate: AttentionGate, gate_cos: Optional[torch.Tensor], gate_sin: Optional[torch.Tensor],
               valid: Optional[torch.Tensor], positions: Optional[torch.Tensor], scale: float,
               policy: Optional[TokenPolicy] = None) -> Attended:
        """Gates the new tokens, attends under the eviction rule (docs/design.md, section 2) and stores what stays.

        Args:
            query: ``(B, Hq, T, D)``; key, value: ``(B, H, T, D)`` (RoPE applied).
            gate_input: ``(B, T, d)`` the layer input the gate reads; gate_cos/gate_sin ``(B, T, d')``.
            valid: ``(B, T)`` bool, False on padding (None: no padding). positions: ``(B, T)`` for sinks.
            policy: decides the flags instead of the gate, and may prune the pages after each chunk (baselines).

        Returns:
            ``(output (B, Hq, T, D), probs (B, H, T), keep (B, H, T))``; a long prompt is processed in
            ``config.prefill_chunk`` slices, each attending to the compacted cache plus its own block.
        """
        cfg = gate.config
        B, _, T, _ = query.shape
        if not self.is_initialized:
            self._initialise(key, gate)
        elif self.valid_count.shape[0] != B:
            raise ValueError(f"AttnGateCache holds a batch of {self.valid_count.shape[0]}, the input has {B} rows")
        padded = valid is not None
        # Free pages are guaranteed by PagedKV's host bounds, so the CUDA ops need no status read-back.
        with sync_checks(False) if query.is_cuda else contextlib.nullcontext():
            if T == 1 and self.seen > 0:  # a decode step: the short path (no chunk loop, no padding mask needed)
                return self._chunk(query, key, value, gate_input, gate, gate_cos, gate_sin, valid, positions, scale,
                                   policy, padded)
            prompt_call = self.seen == 0
            valid = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=query.device)
            chunk = cfg.prefill_chunk if cfg.prefill_chunk > 0 else max(T, 1)
            parts = [self._chunk(query[:, :, s:s + chunk], key[:, :, s:s + chunk], value[:, :, s:s + chunk],
                                 gate_input[:, s:s + chunk], gate, _cut(gate_cos, s, chunk), _cut(gate_sin, s, chunk),
                                 valid[:, s:s + chunk], None if positions is None else positions[:, s:s + chunk],
                                 scale, policy, padded)
                     for s in range(0, T, chunk)]
        if T > 1:  # end of a prompt: give pages reserved beyond the decode headroom back to the allocator
            self.kv.shrink()
            if self.gate_kv is not None:
                self.gate_kv.pages.shrink()
        if policy is not None or (prompt_call and not cfg.decode_gating):
            self.gate_kv = None  # generated tokens are not scored: the gate's K'/V' are not needed
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(tensors, dim=2) for tensors in zip(*parts))

    def _initialise(self, key: torch.Tensor, gate: AttentionGate) -> None:
        B, H, _, D = key.shape
        window = gate.config.protect_recent
        self.kv = PagedKV(B, H, D, key.dtype, key.device, page_size=self.page_size)
        self.window = RecentWindow(B, H, window, D, key.dtype, key.device, holds_kept=window > 1)
        if self.max_tokens_per_head is not None:
            if self.max_tokens_per_head < window:
                raise ValueError(
                    f"AttnGateCache max_tokens_per_head ({self.max_tokens_per_head}) must be at least the gates' "
                    f"protect_recent window ({window}): every head holds its window")
            self.kv.track_rows(self.max_tokens_per_head - window)
            if self.window.holds_kept:
                self.window.track_rows()
        self.gate_kv = GateKV(B, gate, key.dtype, key.device, self.page_size)
        self.valid_count = torch.zeros(B, dtype=torch.int64, device=key.device)
        self.is_initialized = True

    def _chunk(self, query, key, value, gate_input, gate, gate_cos, gate_sin, valid, positions, scale, policy,
               padded) -> Attended:
        """Flags of one chunk (``valid`` may be None on a decode step: no padding), attention and storage, then the
        policy's hook."""
        B, H, T, _ = key.shape
        valid_rows = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=key.device)
        if policy is not None:
            keep = policy.keep_flags(valid_rows, positions, H) & valid_rows.unsqueeze(1)  # padding is never stored
            probs = keep.float()
        elif self.gate_kv is None:  # decode_gating=False after the prompt: generated tokens are kept unscored
            keep = valid_rows.unsqueeze(1).expand(B, H, T)
            probs = keep.float()
        else:
            gate_out = self.gate_kv.attend(gate, gate_input, gate_cos, gate_sin, valid, self.seen, padded)
            probs, keep = gate.score_heads(gate_out, valid=valid, position_offset=self.seen, positions=positions)
        row_keys = None
        if self.kv.row_limit is not None:  # a token budget: forced keeps (sinks) go last
            forced = keep & (probs < gate.config.threshold) if policy is None else torch.zeros_like(keep)
            row_keys = score_keys(torch.where(forced, float("inf"), probs.float()), self.seen)
        if T == 1 and self.seen > 0:
            out = kept_kv.decode_step(self.kv, self.window, query, key, value, keep, valid, scale, self.seen,
                                      row_keys)
        else:
            out = kept_kv.prefill_chunk(self.kv, self.window, query, key, value, keep, valid,
                                        gate.config.protect_recent, scale, self.seen, row_keys)
        self.seen += T
        self.valid_count += T if valid is None else valid.sum(dim=1)
        if policy is not None:
            policy.after_chunk(self.kv, query, key, valid_rows, self.valid_count)
        self.kv.enforce_limit(T)  # a chunk or step appends at most T rows per head
        return out, probs, keep


def _cut(table: Optional[torch.Tensor], start: int, length: int) -> Optional[torch.Tensor]:
    """Positions ``start .. start + length`` of a gate RoPE table ``(..., T, d')`` (None stays None)."""
    return None if table is None else table[..., start:start + length, :]
