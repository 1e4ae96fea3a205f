"""AttnGateCache: a ``transformers`` Cache whose layers keep, per (batch, KV head), only the K/V the gates keep.

The cache is filled by the gated attention modules that :func:`attngate_ext.add_attention_gates` installs (they
call :meth:`AttnGateLayer.attend`); the generic ``Cache.update`` path of ungated attention is refused.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from ..gate.gate import AttentionGate
from ..ops.kernels import sync_checks
from ..ops.paged import paged_decode_step_, paged_prefill_attention
from .paged_kv import PagedKV
from .window import RecentWindow


class AttnGateLayer(CacheLayerMixin):
    """One decoder layer of an :class:`AttnGateCache`.

    State:
        kv: the model's kept K/V, :class:`PagedKV` over ``(B, H)``: a token whose flag is on goes to its head's
            pages when it leaves the window (w = 1: when it is created), and stays.
        window: :class:`RecentWindow`, the last ``w = protect_recent`` tokens of every head, visible to every query
            inside the window; when a token leaves it, it moves to the pages if kept, else its ring slot is simply
            overwritten. A kept token is thus stored once, and the cache holds the window plus the older kept rows.
        gate_kv: the gate's own K'/V' of every valid token, :class:`PagedKV` over ``(B, h'_kv)``, while later
            tokens are gated; gate_ring: the one-slot ring its fused decode step needs (never visible).
        seen: sequence slots processed, padding included (what ``get_seq_length`` reports, so positions stay right).
        valid_count ``(B,)``: valid (non-padding) tokens seen, for the retention statistics.
    """

    def __init__(self, page_size: int = 16) -> None:  # noqa: D107  (CacheLayerMixin.__init__ would set keys/values)
        self.page_size = page_size
        self.is_initialized = False
        self.kv: Optional[PagedKV] = None
        self.window: Optional[RecentWindow] = None
        self.gate_kv: Optional[PagedKV] = None
        self.gate_ring: Optional[RecentWindow] = None
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
        self.__init__(self.page_size)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        for store in (self.kv, self.window, self.gate_kv, self.gate_ring):
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

    # ----------------------------------------------------------------------------------------------------
    # The gated attention step
    # ----------------------------------------------------------------------------------------------------

    def _initialise(self, key: torch.Tensor, gate: AttentionGate, window: int) -> None:
        B, H, _, D = key.shape
        S = self.page_size
        self.kv = PagedKV(B, H, D, key.dtype, key.device, page_size=S)
        self.window = RecentWindow(B, H, window, D, key.dtype, key.device, holds_kept=window > 1)
        gcfg = gate.config
        self.gate_kv = PagedKV(B, gcfg.num_kv_heads, gcfg.head_dim, key.dtype, key.device, page_size=S)
        # The gate's decode ring: one slot, or for a local gate (attention_window W > 0) the W slots of its K'/V'.
        self.gate_ring = RecentWindow(B, gcfg.num_kv_heads, max(gcfg.attention_window, 1), gcfg.head_dim, key.dtype,
                                      key.device)
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
        flag_source: Optional[Any] = None,
        after_chunk: Optional[Any] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gates the new tokens, attends under the eviction rule (docs/design.md, section 2) and stores only what stays.

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
        if not self.is_initialized:
            self._initialise(key, gate, cfg.protect_recent)
        elif self.valid_count.shape[0] != B:
            raise ValueError(f"AttnGateCache holds a batch of {self.valid_count.shape[0]}, the input has {B} rows")
        # Free pages are guaranteed by PagedKV's host bounds, so the CUDA ops need no status read-back.
        no_read_back = sync_checks(False) if query.is_cuda else contextlib.nullcontext()
        if T == 1 and self.seen > 0:  # a decode step: the short path (no chunk loop, no padding mask needed)
            with no_read_back:
                out, probs, keep = self._attend_chunk(query, key, value, gate_input, gate, gate_cos, gate_sin, valid,
                                                      positions, scale, flag_source)
                if after_chunk is not None:
                    after_chunk(self, query, key, valid if valid is not None else self._all_valid(B, T, query))
            return out, probs, keep
        if valid is None:
            valid = self._all_valid(B, T, query)
        prompt_call = self.seen == 0
        chunk = cfg.prefill_chunk if cfg.prefill_chunk > 0 and T > 1 else max(T, 1)
        outputs, all_probs, all_keep = [], [], []
        with no_read_back:
            for start in range(0, T, chunk):
                piece = slice(start, start + chunk)
                out, probs, keep = self._attend_chunk(
                    query[:, :, piece], key[:, :, piece], value[:, :, piece], gate_input[:, piece], gate,
                    None if gate_cos is None else gate_cos[..., piece, :],
                    None if gate_sin is None else gate_sin[..., piece, :],
                    valid[:, piece], None if positions is None else positions[:, piece], scale, flag_source,
                )
                if after_chunk is not None:
                    after_chunk(self, query[:, :, piece], key[:, :, piece], valid[:, piece])
                outputs.append(out)
                all_probs.append(probs)
                all_keep.append(keep)
        if T > 1:  # end of a prompt: give pages reserved beyond the decode headroom back to the allocator
            self.kv.shrink()
            if self.gate_kv is not None:
                self.gate_kv.shrink()
        if flag_source is not None or (prompt_call and not cfg.decode_gating):
            self.gate_kv = self.gate_ring = None  # generated tokens are not scored: the gate's K'/V' are not needed
            self.gating_done = True
        if len(outputs) == 1:
            return outputs[0], all_probs[0], all_keep[0]
        return torch.cat(outputs, dim=2), torch.cat(all_probs, dim=2), torch.cat(all_keep, dim=2)

    @staticmethod
    def _all_valid(B: int, T: int, like: torch.Tensor) -> torch.Tensor:
        return torch.ones(B, T, dtype=torch.bool, device=like.device)

    def _attend_chunk(self, query, key, value, gate_input, gate, gate_cos, gate_sin, valid, positions, scale,
                      flag_source):
        """Flags of a chunk (``valid`` may be None on a decode step: no padding), then attention and storage."""
        B, H, T, _ = key.shape
        if flag_source is not None:
            valid_rows = valid if valid is not None else self._all_valid(B, T, key)
            keep = flag_source(valid_rows, positions, H) & valid_rows.unsqueeze(1)  # padding is never stored
            probs = keep.float()
        elif self.gating_done:
            keep = (valid if valid is not None else self._all_valid(B, T, key)).unsqueeze(1).expand(B, H, T)
            probs = keep.float()
        else:
            gate_out = self._gate_attention(gate, gate_input, gate_cos, gate_sin, valid)
            probs, keep = gate.score_heads(gate_out, valid=valid, position_offset=self.seen, positions=positions)
        if T == 1 and self.seen > 0:
            out = self._decode_step(query, key, value, keep, valid, scale)
        else:
            out = self._prefill_chunk(query, key, value, keep, valid, scale, gate.config.protect_recent)
        self.seen += T
        self.valid_count += T if valid is None else valid.sum(dim=1)
        return out, probs, keep

    def _gate_attention(self, gate, x, cos, sin, valid) -> torch.Tensor:
        """The gate's causal attention over its own K'/V' cache plus the new tokens; caches their K'/V'."""
        gq, gk, gv = gate.project(x, cos, sin)
        store = self.gate_kv
        B, Hg, T, d = gk.shape
        scale = d**-0.5
        if gate.config.attention_window > 0:
            return self._local_gate_attention(gq, gk, gv, valid, scale)
        if T == 1 and self.seen > 0:  # every valid gate token is kept (valid is None: no padding)
            ring = self.gate_ring
            ring.reserve(1)
            keep = valid.expand(B, Hg) if valid is not None else torch.ones(B, Hg, dtype=torch.bool, device=x.device)
            taken = store.prepare_append(1)
            out = paged_decode_step_(gq[:, :, 0], store.key_pages, store.value_pages, store.page_table, store.lengths,
                                     store.free_pages, store.free_count, gk[:, :, 0], gv[:, :, 0], keep,
                                     None if valid is None else valid[:, 0], ring.keys, ring.values, ring.visible, 0,
                                     scale)
            store.appended(1, taken)
            return out.unsqueeze(2)
        gate_keep = valid.unsqueeze(1).expand(B, Hg, T)
        if self.seen == 0 and not self._padded:  # a prompt without padding: plain causal attention
            out = F.scaled_dot_product_attention(gq, gk, gv, is_causal=True, enable_gqa=gq.shape[1] != Hg)
        else:  # every gate token is kept: query t sees the cached rows and the valid chunk tokens up to itself
            out = paged_prefill_attention(gq, store.key_pages, store.value_pages, store.page_table, store.lengths, gk,
                                          gv, gate_keep, valid, 1, scale)
        store.append(gk, gv, gate_keep)
        return out

    def _local_gate_attention(self, gq, gk, gv, valid, scale) -> torch.Tensor:
        """A local gate (``attention_window`` W > 0) attends to the last W slots only: its K'/V' live in the W-slot
        ring alone (never in pages), written and read like the model's window with every flag off."""
        store, ring = self.gate_kv, self.gate_ring
        B, Hg, T, _ = gk.shape
        none = torch.zeros(B, Hg, T, dtype=torch.bool, device=gk.device)
        if T == 1 and self.seen > 0:
            slot = self.seen % ring.size
            ring.reserve(slot + 1)
            out = paged_decode_step_(gq[:, :, 0], store.key_pages, store.value_pages, store.page_table, store.lengths,
                                     store.free_pages, store.free_count, gk[:, :, 0], gv[:, :, 0], none[..., 0],
                                     None if valid is None else valid[:, 0], ring.keys, ring.values, ring.visible,
                                     slot, scale)
            return out.unsqueeze(2)
        extra = {}
        if ring.size > 1 and self.seen > 0:
            extra = dict(extra_key=ring.keys, extra_value=ring.values, extra_until=ring.until(self.seen, T))
        out = paged_prefill_attention(gq, store.key_pages, store.value_pages, store.page_table, store.lengths, gk, gv,
                                      none, valid, ring.size, scale, **extra)
        ring.write(gk, gv, none, valid if valid is not None else self._all_valid(B, T, gk), self.seen)
        return out

    def _prefill_chunk(self, query, key, value, keep, valid, scale, window) -> torch.Tensor:
        """A chunk of new tokens: attends to the pages, the window ring and itself under the rule, then moves the
        kept ring rows whose slots the chunk takes to the pages, stores the chunk's kept tokens older than the
        window in the pages and its last ``w`` tokens in the ring."""
        kv, ring = self.kv, self.window
        T = key.shape[2]
        extra = {}
        if ring.size > 1 and self.seen > 0:
            extra = dict(extra_key=ring.keys, extra_value=ring.values, extra_until=ring.until(self.seen, T))
        out = paged_prefill_attention(query, kv.key_pages, kv.value_pages, kv.page_table, kv.lengths, key, value, keep,
                                      valid, window, scale, **extra)
        if not ring.holds_kept:
            kv.append(key, value, keep)
        else:
            if self.seen > 0:
                kv.append(ring.keys, ring.values, ring.leaving(self.seen, T))
            older = T - ring.size
            if older > 0:
                kv.append(key[:, :, :older], value[:, :, :older], keep[..., :older])
        ring.write(key, value, keep, valid, self.seen)
        return out

    def _decode_step(self, query, key, value, keep, valid, scale) -> torch.Tensor:
        """One new token in one fused op: into the window ring, attention over the pages and the ring. With w > 1
        the kept token leaving the window moves to the pages first and the new token waits in the ring with its
        flag (``ring_keep``); with w = 1 a kept new token goes to the pages directly."""
        kv, ring = self.kv, self.window
        slot = self.seen % ring.size
        ring.reserve(slot + 1)
        taken = kv.prepare_append(1)
        out = paged_decode_step_(query[:, :, 0], kv.key_pages, kv.value_pages, kv.page_table, kv.lengths,
                                 kv.free_pages, kv.free_count, key[:, :, 0], value[:, :, 0], keep[..., 0],
                                 None if valid is None else valid[:, 0], ring.keys, ring.values, ring.visible,
                                 slot, scale, ring.keep if ring.holds_kept else None)
        kv.appended(1, taken)
        return out.unsqueeze(2)

    # ----------------------------------------------------------------------------------------------------
    # Accounting
    # ----------------------------------------------------------------------------------------------------

    def memory(self) -> Dict[str, Any]:
        """This layer's part of :meth:`AttnGateCache.memory_report` (reads lengths back: one synchronisation)."""
        kv = self.kv
        B, H = kv.lengths.shape
        S = kv.page_size
        lengths = kv.lengths.long()
        pages_held = int(((lengths + S - 1) // S).sum())
        pages_free = kv.free_page_count()
        gate_held = gate_free = gate_meta = 0
        if self.gate_kv is not None:
            g = self.gate_kv
            gate_held = g.pages_used() * g.page_bytes + self.gate_ring.nbytes
            gate_free = g.free_page_count() * g.page_bytes
            gate_meta = g.metadata_bytes()
        kept_heads = (lengths + self.window.visible_rows(self.seen)).sum(dim=0).cpu()
        return {
            "kv_bytes": pages_held * kv.page_bytes + self.window.nbytes,
            "gate_bytes": gate_held,
            "free_page_bytes": pages_free * kv.page_bytes + gate_free,
            "metadata_bytes": kv.metadata_bytes() + gate_meta + self.valid_count.nbytes,
            "dense_bytes": 2 * B * H * self.seen * kv.key_pages.shape[2] * kv.key_pages.element_size(),
            "dense_valid_bytes": 2 * H * int(self.valid_count.sum().item()) * kv.key_pages.shape[2]
            * kv.key_pages.element_size(),
            "pages_held": pages_held,
            "pages_free": pages_free,
            "rows_held": int(lengths.sum()),
            "kept_heads": kept_heads,
            "valid_tokens": int(self.valid_count.sum().item()),
            "heads": H,
            "row_heads": B * H,
        }


class AttnGateCache(Cache):
    """A ``transformers`` Cache for gated models: per layer and per (batch, KV head) only the kept K/V.

    ``model.generate`` on a gated model creates one automatically; build one yourself to inspect it afterwards::

        cache = AttnGateCache()
        model.generate(input_ids, past_key_values=cache, max_new_tokens=32)   # ``cache=`` on transformers >= 5.24
        print(cache.memory_report())

    Layers are created lazily. ``get_seq_length()`` counts sequence slots seen (padding included, as in
    ``DynamicCache``), so positions stay right even though evicted rows are gone.
    """

    def __init__(self, page_size: int = 16) -> None:
        """``page_size``: rows per page of every (row, KV head) (the unit in which memory is taken and given back)."""
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"AttnGateCache page_size must be an integer >= 1, got {page_size!r}")
        super().__init__(layers=[])
        self.page_size = page_size

    def layer(self, layer_idx: int) -> AttnGateLayer:
        """The cache of decoder layer ``layer_idx`` (created on first use)."""
        while len(self.layers) <= layer_idx:
            self.layers.append(AttnGateLayer(self.page_size))
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
            ``held_bytes``: K/V the cache holds for tokens: ``kv_bytes + gate_bytes``;
            ``kv_bytes``: the model's K/V: pages held by some (row, head), plus the window ring (the last
            ``protect_recent`` tokens of every head);
            ``gate_bytes``: the gates' own K'/V' pages held (and their one-slot decode ring);
            ``free_page_bytes``: pages allocated in the pools but held by no head (decode headroom);
            ``metadata_bytes``: page tables, lengths, free stacks, counters;
            ``allocated_bytes``: everything: ``held_bytes + free_page_bytes + metadata_bytes``;
            ``dense_bytes``: a ``DynamicCache`` of the same sequence slots (``2 * B * H * seen * D`` per layer);
            ``dense_valid_bytes``: the same without padding slots (what a dense cache needs for the real tokens);
            ``rounding_bytes``: the unused rows of the model's K/V pages held (part of ``kv_bytes``);
            ``pages_held`` / ``pages_free`` / ``page_size``; ``pages_needed``: ``ceil(rows held / page_size)`` per
            layer, summed (pages held exceed it by less than one page per (layer, row, head));
            ``kept_rows`` / ``total_rows``: K/V rows the model attends to (paged rows and evicted tokens still in
            the window) / valid tokens, over (layer, batch, KV head);
            ``eviction_ratio``: ``1 - kept_rows / total_rows`` (padding excluded);
            ``retention_per_layer``: list of kept fractions; ``retention_per_head``: list (layer) of lists (head).
        This reads lengths and free counts back from the device (a few synchronisations).
        """
        totals = dict.fromkeys(("kv_bytes", "gate_bytes", "free_page_bytes", "metadata_bytes", "dense_bytes",
                                "dense_valid_bytes", "pages_held", "pages_free", "pages_needed", "rounding_bytes", "kept_rows",
                                "total_rows"), 0)
        per_layer: List[float] = []
        per_head: List[List[float]] = []
        page_size = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            m = layer.memory()
            page_size = layer.kv.page_size
            for key in ("kv_bytes", "gate_bytes", "free_page_bytes", "metadata_bytes", "dense_bytes",
                        "dense_valid_bytes", "pages_held", "pages_free"):
                totals[key] += m[key]
            totals["pages_needed"] += -(-m["rows_held"] // page_size)
            totals["rounding_bytes"] += (m["pages_held"] * page_size - m["rows_held"]) * (layer.kv.page_bytes // page_size)
            valid_tokens, H = m["valid_tokens"], m["heads"]
            totals["kept_rows"] += int(m["kept_heads"].sum())
            totals["total_rows"] += valid_tokens * H
            per_head.append([int(k) / valid_tokens if valid_tokens else 1.0 for k in m["kept_heads"].tolist()])
            per_layer.append(float(sum(per_head[-1]) / H))
        held = totals["kv_bytes"] + totals["gate_bytes"]
        kept, total = totals.pop("kept_rows"), totals.pop("total_rows")
        return {
            "held_bytes": held,
            **{k: totals[k] for k in ("kv_bytes", "gate_bytes", "free_page_bytes", "metadata_bytes")},
            "allocated_bytes": held + totals["free_page_bytes"] + totals["metadata_bytes"],
            "dense_bytes": totals["dense_bytes"],
            "dense_valid_bytes": totals["dense_valid_bytes"],
            "pages_held": totals["pages_held"],
            "pages_free": totals["pages_free"],
            "pages_needed": totals["pages_needed"],
            "rounding_bytes": totals["rounding_bytes"],
            "page_size": page_size,
            "kept_rows": kept,
            "total_rows": total,
            "eviction_ratio": 1.0 - kept / total if total else 0.0,
            "retention_per_layer": per_layer,
            "retention_per_head": per_head,
        }
