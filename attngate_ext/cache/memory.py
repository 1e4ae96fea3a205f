"""What an AttnGateCache holds against what a dense cache of the same tokens would hold.

:func:`measure_layer` reads one layer back from the device; :meth:`MemoryReport.of_layers` adds the layers up into
the report that :meth:`attngate_ext.AttnGateCache.memory_report` returns.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, Iterable, List

import torch

if TYPE_CHECKING:
    from .layer import AttnGateLayer


@dataclasses.dataclass
class LayerMemory:
    """One layer's part of the report (see :class:`MemoryReport` for the byte fields)."""

    kv_bytes: int
    gate_bytes: int
    free_page_bytes: int
    metadata_bytes: int
    dense_bytes: int
    dense_valid_bytes: int
    pages_held: int
    pages_free: int
    page_size: int
    rows_held: int  # paged rows of the model's K/V
    rounding_bytes: int  # unused rows of the model's K/V pages held
    kept_heads: torch.Tensor  # (H,) rows attended to per KV head, over the batch (CPU)
    valid_tokens: int  # over the batch


def measure_layer(layer: "AttnGateLayer") -> LayerMemory:
    """Reads one initialised layer's sizes back (a few host synchronisations)."""
    kv, window, gate_kv = layer.kv, layer.window, layer.gate_kv
    B, H = kv.lengths.shape
    lengths = kv.lengths.long()
    pages_held = kv.pages_used()
    pages_free = kv.free_page_count()
    valid_tokens = int(layer.valid_count.sum().item())
    row_bytes = 2 * kv.key_pages.shape[2] * kv.key_pages.element_size()  # one K row and one V row
    return LayerMemory(
        kv_bytes=pages_held * kv.page_bytes + window.nbytes,
        gate_bytes=gate_kv.held_bytes() if gate_kv is not None else 0,
        free_page_bytes=pages_free * kv.page_bytes + (gate_kv.free_bytes() if gate_kv is not None else 0),
        metadata_bytes=kv.metadata_bytes() + (gate_kv.pages.metadata_bytes() if gate_kv is not None else 0)
        + layer.valid_count.nbytes,
        dense_bytes=B * H * layer.seen * row_bytes,
        dense_valid_bytes=H * valid_tokens * row_bytes,
        pages_held=pages_held,
        pages_free=pages_free,
        page_size=kv.page_size,
        rows_held=int(lengths.sum()),
        rounding_bytes=(pages_held * kv.page_size - int(lengths.sum())) * row_bytes,
        kept_heads=(lengths + window.visible_rows(layer.seen)).sum(dim=0).cpu(),
        valid_tokens=valid_tokens,
    )


@dataclasses.dataclass
class MemoryReport:
    """What the cache holds, summed over its layers (bytes unless said otherwise).

    Attributes:
        held_bytes: K/V the cache holds for tokens: ``kv_bytes + gate_bytes``.
        kv_bytes: the model's K/V: pages held by some (row, head), plus the window ring (the last ``protect_recent``
            tokens of every head).
        gate_bytes: the gates' own K'/V' pages held and their decode ring (one slot; a local gate, with
            ``attention_window`` W > 0, holds its K'/V' in a W-slot ring alone).
        free_page_bytes: pages allocated in the pools but held by no head (decode headroom).
        metadata_bytes: page tables, lengths, free stacks, counters.
        allocated_bytes: everything: ``held_bytes + free_page_bytes + metadata_bytes``.
        dense_bytes: a ``DynamicCache`` of the same sequence slots (``2 * B * H * seen * D`` per layer).
        dense_valid_bytes: the same without padding slots (what a dense cache needs for the real tokens).
        pages_held, pages_free, page_size: pages of the model's K/V; ``pages_needed``: ``ceil(rows held /
            page_size)`` per layer, summed (pages held exceed it by less than one page per (layer, row, head)).
        rounding_bytes: the unused rows of the model's K/V pages held (part of ``kv_bytes``).
        kept_rows, total_rows: K/V rows the model attends to (paged rows and evicted tokens still in the window) /
            valid tokens, over (layer, batch, KV head).
        eviction_ratio: ``1 - kept_rows / total_rows`` (padding excluded).
        retention_per_layer: kept fraction per layer; retention_per_head: per layer, per KV head.
    """

    held_bytes: int = 0
    kv_bytes: int = 0
    gate_bytes: int = 0
    free_page_bytes: int = 0
    metadata_bytes: int = 0
    allocated_bytes: int = 0
    dense_bytes: int = 0
    dense_valid_bytes: int = 0
    pages_held: int = 0
    pages_free: int = 0
    pages_needed: int = 0
    rounding_bytes: int = 0
    page_size: int = 0
    kept_rows: int = 0
    total_rows: int = 0
    eviction_ratio: float = 0.0
    retention_per_layer: List[float] = dataclasses.field(default_factory=list)
    retention_per_head: List[List[float]] = dataclasses.field(default_factory=list)

    @classmethod
    def of_layers(cls, layers: Iterable[LayerMemory]) -> "MemoryReport":
        """The sum of the layers' parts (an empty cache gives zeros and an eviction ratio of 0)."""
        report = cls()
        summed = ("kv_bytes", "gate_bytes", "free_page_bytes", "metadata_bytes", "dense_bytes", "dense_valid_bytes",
                  "pages_held", "pages_free", "rounding_bytes")
        for layer in layers:
            for name in summed:
                setattr(report, name, getattr(report, name) + getattr(layer, name))
            report.page_size = layer.page_size
            report.pages_needed += -(-layer.rows_held // layer.page_size)
            heads = layer.kept_heads.numel()
            report.kept_rows += int(layer.kept_heads.sum())
            report.total_rows += layer.valid_tokens * heads
            per_head = [int(k) / layer.valid_tokens if layer.valid_tokens else 1.0 for k in layer.kept_heads.tolist()]
            report.retention_per_head.append(per_head)
            report.retention_per_layer.append(float(sum(per_head) / heads))
        report.held_bytes = report.kv_bytes + report.gate_bytes
        report.allocated_bytes = report.held_bytes + report.free_page_bytes + report.metadata_bytes
        report.eviction_ratio = 1.0 - report.kept_rows / report.total_rows if report.total_rows else 0.0
        return report

    def as_dict(self) -> Dict[str, Any]:
        """The report as a dict with the same keys (for JSON)."""
        return dataclasses.asdict(self)
