"""AttnGateCache: a ``transformers`` Cache whose layers keep, per (batch, KV head), only the K/V the gates keep.

The cache is filled by the gated attention modules that :func:`attngate_ext.add_attention_gates` installs (they
call :meth:`AttnGateLayer.attend`); the generic ``Cache.update`` path of ungated attention is refused.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from ..gate.config import AttentionGateConfig
from ..gate.gate import AttentionGate
from ..gate.masks import block_visibility, grouped_attention
from ..ops.kernels import decode_attention, sync_checks
from .varlen_kv import VarLenKV

_NEVER = torch.iinfo(torch.int64).max  # "visible to every later query"


class AttnGateLayer(CacheLayerMixin):
    """One decoder layer of an :class:`AttnGateCache`.

    State:
        kv: the model's gated K/V, :class:`VarLenKV` ``(B, H, C, D)``; rows of a head hold its kept tokens in order,
            followed by its *pending* tokens (the last ``w - 1`` valid tokens, still inside the protected window).
        gate_kv: the gate's own K'/V' of every valid token (``(B, h'_kv, C', d')``), while later tokens are gated.
        pending_keep ``(B, H, w-1)`` / pending_valid ``(B, w-1)``: flags of the last ``w - 1`` sequence slots;
            a pending token whose flag is off is deleted (``compact_kv_``) when it leaves the window.
        seen: sequence slots processed, padding included (what ``get_seq_length`` reports, so positions stay right).
        valid_count ``(B,)``: valid (non-padding) tokens seen, for the retention statistics.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self) -> None:  # noqa: D107  (CacheLayerMixin.__init__ would set unused keys/values)
        self.is_initialized = False
        self.kv: Optional[VarLenKV] = None
        self.gate_kv: Optional[VarLenKV] = None
        self.pending_keep: Optional[torch.Tensor] = None
        self.pending_valid: Optional[torch.Tensor] = None
        self.valid_count: Optional[torch.Tensor] = None
        self.seen = 0
        self.gating_done = False  # decode_gating=False: the prompt call is over, later tokens are kept unscored
        self._padded = False  # whether the current call has a padding mask

    # ----------------------------------------------------------------------------------------------------
    # transformers Cache layer interface
    # ----------------------------------------------------------------------------------------------------

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
        self.__init__()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        for store in (self.kv, self.gate_kv):
            if store is not None:
                store.index_batch(indices)
        device = self.valid_count.device
        indices = indices.to(device)
        self.valid_count = self.valid_count.index_select(0, indices)
        self.pending_keep = self.pending_keep.index_select(0, indices)
        self.pending_valid = self.pending_valid.index_select(0, indices)

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

    # ----------------------------------------------------------------------------------------------------
    # The gated attention step
    # ----------------------------------------------------------------------------------------------------

    def _initialise(self, key: torch.Tensor, gate: AttentionGate, window: int) -> None:
        B, H, _, D = key.shape
        self.kv = VarLenKV(B, H, D, key.dtype, key.device)
        gcfg = gate.config
        self.gate_kv = VarLenKV(B, gcfg.num_kv_heads, gcfg.head_dim, key.dtype, key.device)
        self.pending_keep = torch.zeros(B, H, window - 1, dtype=torch.bool, device=key.device)
        self.pending_valid = torch.zeros(B, window - 1, dtype=torch.bool, device=key.device)
        self.valid_count = torch.zeros(B, dtype=torch.int64, device=key.device)
        self.is_initialized = True

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        gate_input: torch.Tensor,
        gate: AttentionGate,
        gate_cos: Optional[torch.Tensor],
        gate_sin: Optional[torch.Tensor],
        valid: Optional[torch.Tensor],
        positions: Optional[torch.Tensor],
        scale: float,
        dropout_p: float = 0.0,
        flag_source: Optional[Any] = None,
        after_chunk: Optional[Any] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gates the new tokens, attends under SPEC section 2's rule and stores only what stays.

        Args:
            query: ``(B, Hq, T, D)``; key, value: ``(B, H, T, D)`` (RoPE applied).
            gate_input: ``(B, T, d)`` the layer input the gate reads; gate_cos/gate_sin ``(B, T, d')``.
            valid: ``(B, T)`` bool, False on padding (None: no padding). positions: ``(B, T)`` for sinks.
            flag_source: optional ``f(valid, positions, heads) -> keep (B, H, T)`` that replaces the gate (a
                baseline policy deciding at creation time, see :mod:`attngate_ext.policies`).
            after_chunk: optional ``f(layer, query, key, valid)`` called after each chunk is stored; it may prune
                ``layer.kv`` (baselines that evict later, from the attention tokens receive: H2O, SnapKV).

        Returns:
            ``(output (B, Hq, T, D), probs (B, H, T), keep (B, H, T))``; a long prompt is processed in
            ``config.prefill_chunk`` slices, each attending to the compacted cache plus its own block.
        """
        cfg = gate.config
        B, _, T, _ = query.shape
        self._padded = valid is not None
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=query.device)
        if not self.is_initialized:
            self._initialise(key, gate, cfg.protect_recent)
        elif self.valid_count.shape[0] != B:
            raise ValueError(f"AttnGateCache holds a batch of {self.valid_count.shape[0]}, the input has {B} rows")
        prompt_call = self.seen == 0
        chunk = cfg.prefill_chunk if cfg.prefill_chunk > 0 and T > 1 else max(T, 1)
        outputs, all_probs, all_keep = [], [], []
        with sync_checks(False):  # capacities are guaranteed by VarLenKV.reserve, so no read-back is needed
            for start in range(0, T, chunk):
                piece = slice(start, start + chunk)
                out, probs, keep = self._attend_chunk(
                    query[:, :, piece], key[:, :, piece], value[:, :, piece], gate_input[:, piece], gate,
                    None if gate_cos is None else gate_cos[:, piece], None if gate_sin is None else gate_sin[:, piece],
                    valid[:, piece], None if positions is None else positions[:, piece], scale, dropout_p,
                    flag_source,
                )
                if after_chunk is not None:
                    after_chunk(self, query[:, :, piece], key[:, :, piece], valid[:, piece])
                outputs.append(out)
                all_probs.append(probs)
                all_keep.append(keep)
        if T > 1:  # end of a prompt: give the rows reserved for the worst case back to the allocator
            self.kv.trim()
            if self.gate_kv is not None:
                self.gate_kv.trim()
        if flag_source is not None or (prompt_call and not cfg.decode_gating):
            self.gate_kv = None  # generated tokens are not scored, so the gate's K'/V' are no longer needed
            self.gating_done = True
        return torch.cat(outputs, dim=2), torch.cat(all_probs, dim=2), torch.cat(all_keep, dim=2)

    def _attend_chunk(self, query, key, value, gate_input, gate, gate_cos, gate_sin, valid, positions, scale,
                      dropout_p, flag_source):
        B, H, T, _ = key.shape
        if flag_source is not None:
            keep = flag_source(valid, positions, H) & valid.unsqueeze(1)
            probs = keep.float()
        elif self.gating_done:
            keep = valid.unsqueeze(1).expand(B, H, T)
            probs = keep.float()
        else:
            gate_out = self._gate_attention(gate, gate_input, gate_cos, gate_sin, valid)
            probs, keep = gate.score_heads(gate_out, valid=valid, position_offset=self.seen, positions=positions)
        if T == 1 and self.seen > 0:
            out = self._decode_step(query, key, value, keep, valid, scale, gate.config.protect_recent)
        else:
            out = self._prefill_chunk(query, key, value, keep, valid, scale, dropout_p, gate.config.protect_recent)
        self.seen += T
        self.valid_count += valid.sum(dim=1)
        return out, probs, keep

    def _gate_attention(self, gate, x, cos, sin, valid) -> torch.Tensor:
        """The gate's causal attention over its own K'/V' cache plus the new tokens; caches their K'/V'."""
        gq, gk, gv = gate.project(x, cos, sin)
        store = self.gate_kv
        B, Hg, T, d = gk.shape
        scale = d**-0.5
        gate_keep = valid.unsqueeze(1).expand(B, Hg, T)
        if T == 1 and self.seen > 0:
            store.append(gk, gv, gate_keep)
            return decode_attention(gq[:, :, 0], store.keys, store.values, store.lengths, scale).unsqueeze(2)
        if self.seen == 0 and not self._padded:  # a prompt without padding: plain causal attention
            out = F.scaled_dot_product_attention(gq, gk, gv, is_causal=True, enable_gqa=gq.shape[1] != Hg)
            store.append(gk, gv, None)
            return out
        # Every gate KV head holds the same tokens, so one (B, 1, T, S) mask serves all of them.
        visible = block_visibility(torch.ones_like(gate_keep[:, :1]), valid, window=1)
        keys, values = gk, gv
        if self.seen > 0:
            rows = store.used_rows
            live = torch.arange(rows, device=gk.device) < store.lengths[:, :1].unsqueeze(-1)
            visible = torch.cat([live.unsqueeze(2).expand(B, 1, T, rows), visible], dim=-1)
            keys = torch.cat([store.keys[:, :, :rows], gk], dim=2)
            values = torch.cat([store.values[:, :, :rows], gv], dim=2)
        out = grouped_attention(gq, keys, values, visible, scale)
        store.append(gk, gv, gate_keep)
        return out

    def _pending_rows(self, empty: int) -> torch.Tensor:
        """Row index ``(B, H, w-1)`` of each pending slot in its head's cache (``empty`` for empty slots)."""
        lengths = self.kv.lengths.to(torch.int64)
        npend = self.pending_valid.sum(dim=1)
        rank = self.pending_valid.cumsum(dim=1) - 1
        rows = lengths.unsqueeze(-1) - npend.view(-1, 1, 1) + rank.unsqueeze(1)
        return torch.where(self.pending_valid.unsqueeze(1), rows, empty)

    def _drop_rows(self, rows: torch.Tensor, drop: torch.Tensor) -> None:
        """Deletes rows ``rows[b, h, k]`` where ``drop[b, h, k]``, keeping the order of the others."""
        C = self.kv.capacity
        B, H = drop.shape[:2]
        keep_rows = torch.ones(B, H, C + 1, dtype=torch.bool, device=drop.device)
        keep_rows.scatter_(2, torch.where(drop, rows, C), False)
        self.kv.compact(keep_rows[..., :C])

    def _prefill_chunk(self, query, key, value, keep, valid, scale, dropout_p, window) -> torch.Tensor:
        kv = self.kv
        B, H, T, _ = key.shape
        visible = block_visibility(keep, valid, window)
        keys, values = key, value
        if self.seen > 0:
            # Cached rows: kept rows are visible to every later query; a pending row whose flag is off only
            # until the query ``window - 1`` slots after it.
            C = kv.used_rows
            row = torch.arange(C, device=key.device)
            deadline = torch.where(row < kv.lengths.unsqueeze(-1), _NEVER, -1)
            if window > 1:
                slots = self.seen - (window - 1) + torch.arange(window - 1, device=key.device)
                pending_deadline = torch.where(self.pending_keep, _NEVER, slots + window - 1)
                deadline = torch.cat([deadline, deadline.new_empty(B, H, 1)], dim=2)
                deadline.scatter_(2, self._pending_rows(C), pending_deadline)
                deadline = deadline[..., :C]
            query_slots = self.seen + torch.arange(T, device=key.device)
            cached_visible = deadline.unsqueeze(2) >= query_slots.view(1, 1, T, 1)
            visible = torch.cat([cached_visible, visible], dim=-1)
            keys = torch.cat([kv.keys[:, :, :C], key], dim=2)
            values = torch.cat([kv.values[:, :, :C], value], dim=2)
        out = grouped_attention(query, keys, values, visible, scale, dropout_p)
        if window > 1:
            # Earlier pending tokens that leave the window of the next query go now if their flag is off.
            leaving = torch.arange(window - 1, device=key.device) < T
            drop = self.pending_valid.unsqueeze(1) & ~self.pending_keep & leaving
            self._drop_rows(self._pending_rows(self.kv.capacity), drop)
        in_next_window = torch.arange(T, device=key.device) >= T - (window - 1)
        kv.reserve(T, growth=0.5)  # chunks of one prompt: grow by half (the capacity is trimmed after the prompt)
        kv.append(key, value, valid.unsqueeze(1) & (keep | in_next_window))
        self._push_pending(keep, valid)
        return out

    def _decode_step(self, query, key, value, keep, valid, scale, window) -> torch.Tensor:
        kv = self.kv
        B, H, _, _ = key.shape
        # The new token is inside its own window: store it, attend over every live row, then apply the flag of
        # the token that leaves the window of the next query (the new token itself when w = 1).
        kv.append(key, value, valid.unsqueeze(1).expand(B, H, 1))
        out = decode_attention(query[:, :, 0], kv.keys, kv.values, kv.lengths, scale).unsqueeze(2)
        if window == 1:
            drop = valid & ~keep[..., 0]
            kv.lengths -= drop.to(torch.int32)
            return out
        tail_valid = torch.cat([self.pending_valid, valid], dim=1)
        tail_keep = torch.cat([self.pending_keep, keep], dim=2)
        oldest_row = kv.lengths.to(torch.int64) - tail_valid.sum(dim=1, keepdim=True)
        drop = tail_valid[:, :1].unsqueeze(1) & ~tail_keep[..., :1]
        self._drop_rows(oldest_row.unsqueeze(-1).clamp_min(0), drop)
        self.pending_valid = tail_valid[:, 1:]
        self.pending_keep = tail_keep[..., 1:]
        return out

    def _push_pending(self, keep: torch.Tensor, valid: torch.Tensor) -> None:
        n = self.pending_valid.shape[1]
        if n == 0:
            return
        self.pending_keep = torch.cat([self.pending_keep, keep], dim=2)[..., -n:]
        self.pending_valid = torch.cat([self.pending_valid, valid], dim=1)[:, -n:]

    # ----------------------------------------------------------------------------------------------------
    # Accounting
    # ----------------------------------------------------------------------------------------------------

    def allocated_bytes(self) -> int:
        total = 0
        for tensor in (self.pending_keep, self.pending_valid, self.valid_count):
            if tensor is not None:
                total += tensor.nbytes
        for store in (self.kv, self.gate_kv):
            if store is not None:
                total += store.nbytes
        return total


class AttnGateCache(Cache):
    """A ``transformers`` Cache for gated models: per layer and per (batch, KV head) only the kept K/V.

    ``model.generate`` on a gated model creates one automatically; build one yourself to inspect it afterwards::

        cache = AttnGateCache()
        model.generate(input_ids, past_key_values=cache, max_new_tokens=32)   # ``cache=`` on transformers >= 5.24
        print(cache.memory_report())

    Layers are created lazily. ``get_seq_length()`` counts sequence slots seen (padding included, as in
    ``DynamicCache``), so positions stay right even though evicted rows are gone.
    """

    def __init__(self) -> None:
        super().__init__(layers=[])

    def layer(self, layer_idx: int) -> AttnGateLayer:
        """The cache of decoder layer ``layer_idx`` (created on first use)."""
        while len(self.layers) <= layer_idx:
            self.layers.append(AttnGateLayer())
        return self.layers[layer_idx]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Refused: only gated attention layers fill this cache (see :meth:`layer`)."""
        return AttnGateLayer.update(None, key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def memory_report(self) -> Dict[str, Any]:
        """What the cache holds against what a dense cache of the same tokens would hold.

        Returns a dict with
            ``allocated_bytes``: every tensor the cache holds (gated K/V at capacity, lengths, the gates' K'/V'
            caches, pending flags);
            ``gate_bytes``: the part of that held by the gates' K'/V' caches;
            ``dense_bytes``: a ``DynamicCache`` of the same sequence slots (``2 * B * H * seen * D`` per layer);
            ``kept_rows`` / ``total_rows``: K/V rows held / valid tokens, over (layer, batch, KV head);
            ``eviction_ratio``: ``1 - kept_rows / total_rows`` (padding excluded);
            ``retention_per_layer``: list of kept fractions; ``retention_per_head``: list (layer) of lists (head).
        This reads lengths back from the device (one synchronisation).
        """
        allocated = gate_bytes = dense = kept = total = 0
        per_layer: List[float] = []
        per_head: List[List[float]] = []
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            kv = layer.kv
            B, H, _, D = kv.keys.shape
            allocated += layer.allocated_bytes()
            gate_bytes += layer.gate_kv.nbytes if layer.gate_kv is not None else 0
            dense += 2 * B * H * layer.seen * D * kv.keys.element_size()
            kept_heads = kv.lengths.to(torch.int64).sum(dim=0).cpu()
            valid_tokens = int(layer.valid_count.sum().item())
            kept += int(kept_heads.sum())
            total += valid_tokens * H
            per_head.append([int(k) / valid_tokens if valid_tokens else 1.0 for k in kept_heads.tolist()])
            per_layer.append(float(sum(per_head[-1]) / H))
        return {
            "allocated_bytes": allocated,
            "gate_bytes": gate_bytes,
            "dense_bytes": dense,
            "kept_rows": kept,
            "total_rows": total,
            "eviction_ratio": 1.0 - kept / total if total else 0.0,
            "retention_per_layer": per_layer,
            "retention_per_head": per_head,
        }
