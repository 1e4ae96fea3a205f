"""One pipeline of every paged op (append, compaction, row removal, prefill attention, the fused decode step with
ring_keep, decode attention) with random inputs, run by the op namespace given (``torch.ops.attngate`` or the
pure-PyTorch references): shared by the torch.compile and CUDA-graph tests."""

from __future__ import annotations

from typing import Dict

import torch

from attngate_ext import gather_pages
from attngate_ext.ops import paged_reference

B, H, GROUP, S, D, W = 2, 2, 2, 4, 16, 3
SCALE = 0.25
STATE = ("key_pages", "value_pages", "page_table", "lengths", "free_pages", "free_count")


def pipeline(ops, t: Dict[str, torch.Tensor]):
    """Append a chunk, prune every third row, remove listed rows, attend with a chunk, then one decode step."""
    s = [t[n] for n in STATE]
    prefill = ops.paged_prefill_attention(t["chunk_query"], *s[:4], t["key"], t["value"], t["keep"], None, 2, SCALE)
    ops.paged_append_kv_(*s, t["key"], t["value"], t["keep"])
    ops.paged_compact_kv_(*s, t["prune"])
    ops.paged_remove_rows_(*s, t["rows"])
    step = ops.paged_decode_step_(t["query"], *s, t["new_key"], t["new_value"], t["new_keep"], None, t["ring_key"],
                                  t["ring_value"], t["ring_valid"], 1, SCALE, t["ring_keep"])
    decode = ops.paged_decode_attention(t["query"], *s[:4], SCALE, t["ring_key"], t["ring_value"], t["ring_valid"])
    return prefill, step, decode


def pipeline_inputs(device: str, seed: int, chunk: int = 5) -> Dict[str, torch.Tensor]:
    """A random paged state and inputs with a ``chunk``-token append (T > 32 takes the multi-launch CUDA path); the
    rows to remove are chosen live after the append and the pruning."""
    g = torch.Generator().manual_seed(seed)
    T = chunk
    M = -(-(8 + T) // S) + 1  # room for the longest head after the append
    P = B * H * M
    perm = torch.randperm(P, generator=g).to(torch.int32)
    lengths = torch.randint(0, 9, (B, H), generator=g, dtype=torch.int32)
    table = torch.full((B, H, M), -1, dtype=torch.int32)
    used = 0
    for b in range(B):
        for h in range(H):
            k = -(-int(lengths[b, h]) // S)
            table[b, h, :k] = perm[used : used + k]
            used += k
    free = torch.zeros(P, dtype=torch.int32)
    free[: P - used] = perm[used:]
    t = {
        "key_pages": torch.randn(P, S, D, generator=g), "value_pages": torch.randn(P, S, D, generator=g),
        "page_table": table, "lengths": lengths, "free_pages": free,
        "free_count": torch.tensor([P - used], dtype=torch.int32),
        "chunk_query": torch.randn(B, H * GROUP, T, D, generator=g),
        "key": torch.randn(B, H, T, D, generator=g), "value": torch.randn(B, H, T, D, generator=g),
        "keep": torch.rand(B, H, T, generator=g) < 0.6,
        "prune": torch.arange(M * S).remainder(3).ne(1).expand(B, H, M * S).clone(),
        "query": torch.randn(B, H * GROUP, D, generator=g),
        "new_key": torch.randn(B, H, D, generator=g), "new_value": torch.randn(B, H, D, generator=g),
        "new_keep": torch.rand(B, H, generator=g) < 0.5,
        "ring_key": torch.randn(B, H, W, D, generator=g), "ring_value": torch.randn(B, H, W, D, generator=g),
        "ring_valid": torch.rand(B, H, W, generator=g) < 0.7,
    }
    t["ring_keep"] = (torch.rand(B, H, W, generator=g) < 0.5) & t["ring_valid"]
    sim = {n: t[n].clone() for n in STATE}  # where the rows to remove are chosen: after append and pruning
    paged_reference.paged_append_kv_(*sim.values(), t["key"], t["value"], t["keep"])
    paged_reference.paged_compact_kv_(*sim.values(), t["prune"])
    rows = torch.full((B, H, 2), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            n = int(sim["lengths"][b, h])
            if n > 0:
                rows[b, h, 0] = n // 2
            if n > 2:
                rows[b, h, 1] = 0
    t["rows"] = rows
    return {k: v.to(device) for k, v in t.items()}


def assert_same_results(got: Dict[str, torch.Tensor], outs, ref: Dict[str, torch.Tensor], ref_outs) -> None:
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-4, atol=1e-5)
    for name in ("lengths", "free_count", "ring_key", "ring_value", "ring_valid", "ring_keep"):
        assert torch.equal(got[name].cpu(), ref[name].cpu()), name
    rows = gather_pages(*(got[n].cpu() for n in STATE[:4]))
    for a, b in zip(rows, gather_pages(*(ref[n].cpu() for n in STATE[:4]))):
        assert torch.equal(a, b)
