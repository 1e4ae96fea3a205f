"""Every paged storage op (append, compaction, row removal): no heads at all, and chains of them on one state against
the references, all exact."""

from __future__ import annotations

import pytest
import torch

import attngate_ext

from helpers.paged_state import assert_invariant, make_paged_state, pages_for, ragged_lengths, random_rows, run_both
from helpers.tensors import randn_strided, random_mask


def _op_args(op: str, B: int, H: int, D: int, device):
    if op == "paged_append_kv_":
        key = torch.randn(B, H, 4, D, device=device)
        return key, key.clone(), None
    if op == "paged_compact_kv_":
        return (torch.ones(B, H, 5, dtype=torch.bool, device=device),)
    return (torch.zeros(B, H, 4, dtype=torch.int32, device=device),)


@pytest.mark.parametrize("op", ["paged_append_kv_", "paged_compact_kv_", "paged_remove_rows_"])
@pytest.mark.parametrize("B,H", [(0, 2), (3, 0)])
def test_no_heads(device, op, B, H):
    """B * H = 0: nothing to do, but free_count is still checked (as the reference does)."""
    state = make_paged_state(B, H, 3, 4, 16, [], device=device, spare_pages=5)
    run_both(op, state, *_op_args(op, B, H, 16, device))
    state.free_count.fill_(6)
    snap = state.snapshot()
    with attngate_ext.sync_checks(True), pytest.raises(RuntimeError, match=r"free_count must lie in \[0, P\]"):
        getattr(attngate_ext, op)(*state.tensors(), *_op_args(op, B, H, 16, device))
    state.assert_unchanged(snap)


@pytest.mark.parametrize("S", [1, 4, 16])
def test_chain_of_ops(device, S):
    """append, compact, remove, append, ... on one state: every step equals the reference's, and every page is
    always either in exactly one head or on the free stack."""
    g = torch.Generator().manual_seed(30 + S)
    B, H, D = 2, 2, 32
    M = pages_for(120, S)
    state = make_paged_state(B, H, M, S, D, ragged_lengths(B, H, 30, g), torch.bfloat16, device, spare_pages=B * H * M,
                             gen=g)
    for step in range(10):
        lengths = state.lengths.flatten().tolist()
        kind = ("append", "compact", "remove", "append")[step % 4]
        if kind == "append":
            T = [1, 9, 2 * S + 1][step % 3]
            room = M * S - max(lengths)
            T = min(T, room)
            key = randn_strided((B, H, T, D), torch.bfloat16, device, generator=g)
            value = randn_strided((B, H, T, D), torch.bfloat16, device, generator=g)
            run_both("paged_append_kv_", state, key, value, random_mask((B, H, T), 0.8, device, generator=g))
        elif kind == "compact":
            run_both("paged_compact_kv_", state, random_mask((B, H, max(lengths) + 1), 0.7, device, generator=g))
        else:
            run_both("paged_remove_rows_", state, random_rows(lengths, B, H, 6, g).to(device))
        assert_invariant(state)
    assert_invariant(state)
    assert int(state.lengths.sum()) > 0
