"""paged_compact_kv_ and paged_remove_rows_ against their references, and chains of storage ops on one state.

Comparisons as in test_paged_storage.py: lengths, whole page table (-1 on freed entries), whole free stack, whole
pools and logical rows, all exact.
"""

from __future__ import annotations

from typing import List

import pytest
import torch

import attngate_ext

from conftest import DTYPES, random_mask, randn_strided
from test_paged_storage import (
    PAGE_SIZES,
    assert_invariant,
    make_state,
    pages_for,
    random_lengths,
    run_both,
)


def random_rows(lengths: List[int], B: int, H: int, K: int, gen: torch.Generator, pad: float = 0.3) -> torch.Tensor:
    """(B, H, K) int32: up to K distinct live rows per head in random order, some entries -1 (ignored)."""
    rows = torch.full((B * H, K), -1, dtype=torch.int32)
    for bh, n in enumerate(lengths):
        k = min(n, K)
        picked = torch.randperm(n, generator=gen)[:k].to(torch.int32)
        rows[bh, :k] = picked
        rows[bh] = rows[bh, torch.randperm(K, generator=gen)]
        drop = torch.rand(K, generator=gen) < pad
        rows[bh, drop] = -1 - torch.randint(0, 5, (int(drop.sum()),), generator=gen, dtype=torch.int32)
    return rows.view(B, H, K)


# ---------------------------------------------------------------------------------------------------------
# paged_compact_kv_
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S", PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_matches_reference(device, dtype, S):
    g = torch.Generator().manual_seed(10 + S)
    B, H, D = 2, 3, 64
    top = 5 * S + 3  # heads spanning several pages
    lengths = random_lengths(B, H, top, g)
    state = make_state(B, H, pages_for(top, S) + 1, S, D, lengths, dtype, device, gen=g)
    keep = random_mask((B, H, top + 4), 0.5, device, generator=g)  # L > max(lengths) is allowed
    free_before = int(state.free_count[0])
    run_both("paged_compact_kv_", state, keep)
    assert_invariant(state)
    assert int(state.free_count[0]) > free_before  # pages really went back


@pytest.mark.parametrize("case", ["nothing_kept", "everything_kept", "all_empty", "L_equals_max", "keep_prefix",
                                  "drop_last_only"])
def test_compact_edge_cases(device, case):
    g = torch.Generator().manual_seed(11)
    B, H, S, D = 2, 2, 4, 16
    lengths = [0, 0, 0, 0] if case == "all_empty" else [9, 0, 4, 16]
    state = make_state(B, H, 5, S, D, lengths, torch.float32, device, gen=g)
    L = max(lengths) if case == "L_equals_max" else 20
    keep = random_mask((B, H, L), 0.5, device, generator=g)
    if case == "nothing_kept":
        keep.zero_()
    if case == "everything_kept":
        keep.fill_(True)
    if case == "keep_prefix":  # rows [0, 5) kept, the rest dropped: nothing moves, pages go back
        keep.zero_()
        keep[..., :5] = True
    if case == "drop_last_only":
        keep.fill_(True)
        for bh, n in enumerate(lengths):
            if n:
                keep[bh // H, bh % H, n - 1] = False
    ref = run_both("paged_compact_kv_", state, keep)
    assert_invariant(state)
    if case == "nothing_kept":
        assert int(ref.free_count[0]) == state.key_pages.shape[0]  # every page is free again
        for bh, n in enumerate(lengths):
            assert bool((ref.page_table[bh // H, bh % H, : pages_for(n, S)] == -1).all())


@pytest.mark.parametrize("S", [1, 16])
def test_compact_long_heads(device, S):
    """Heads of hundreds of rows over many pages: many move chunks per head, with chunk-crossing moves."""
    g = torch.Generator().manual_seed(12)
    B, H, D = 1, 3, 128
    lengths = [700, 513, 1]
    state = make_state(B, H, pages_for(700, S), S, D, lengths, torch.bfloat16, device, gen=g)
    keep = random_mask((B, H, 700), 0.3, device, generator=g)
    keep[0, 0, :300] = True  # a long prefix that stays in place
    run_both("paged_compact_kv_", state, keep)
    assert_invariant(state)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_non_contiguous(device, dtype):
    g = torch.Generator().manual_seed(13)
    B, H, S, D = 2, 3, 16, 72
    lengths = random_lengths(B, H, 70, g)
    state = make_state(B, H, 5, S, D, lengths, dtype, device, gen=g, layout="strided")
    keep = random_mask((B, H, 75), 0.5, device, generator=g, layout="transposed")
    assert not keep.is_contiguous()
    run_both("paged_compact_kv_", state, keep)
    assert_invariant(state)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_opcheck(device, dtype):
    state = make_state(2, 2, 4, 4, 16, [3, 9, 0, 16], dtype, device)
    keep = torch.rand(2, 2, 16, device=device) > 0.5
    torch.library.opcheck(torch.ops.attngate.paged_compact_kv_.default, (*state.tensors(), keep))


# ---------------------------------------------------------------------------------------------------------
# paged_remove_rows_
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S", PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_remove_matches_reference(device, dtype, S):
    g = torch.Generator().manual_seed(20 + S)
    B, H, D, K = 2, 3, 64, 2 * S + 3  # enough deletions to empty whole pages
    top = 4 * S + 5
    lengths = random_lengths(B, H, top, g)
    state = make_state(B, H, pages_for(top, S), S, D, lengths, dtype, device, gen=g)
    rows = random_rows(lengths, B, H, K, g).to(device)
    run_both("paged_remove_rows_", state, rows)
    assert_invariant(state)


@pytest.mark.parametrize("case", ["K0", "all_negative", "remove_all", "tail_only", "holes_only", "one_row",
                                  "strided_rows"])
def test_remove_edge_cases(device, case):
    g = torch.Generator().manual_seed(21)
    B, H, S, D = 2, 2, 4, 16
    lengths = [9, 0, 5, 16]
    state = make_state(B, H, 4, S, D, lengths, torch.float16, device, gen=g)
    K = 0 if case == "K0" else 16
    rows = torch.full((B * H, K), -1, dtype=torch.int32)
    for bh, n in enumerate(lengths):
        if case == "remove_all":
            rows[bh, :n] = torch.randperm(n, generator=g).to(torch.int32)
        elif case == "tail_only":  # the last rows: nothing moves, only pages go back
            rows[bh, : min(n, 3)] = torch.arange(n - min(n, 3), n, dtype=torch.int32)
        elif case == "holes_only" and n:  # the first rows: every survivor of the tail moves
            rows[bh, : min(n, 5)] = torch.arange(min(n, 5), dtype=torch.int32)
        elif case in ("one_row", "strided_rows") and n:
            rows[bh, 7] = n // 2
    rows = rows.view(B, H, K).to(device)
    if case == "strided_rows":
        rows = rows.transpose(0, 1).contiguous().transpose(0, 1)
        assert not rows.is_contiguous()
    ref = run_both("paged_remove_rows_", state, rows)
    assert_invariant(state)
    if case == "remove_all":
        assert not bool(ref.lengths.any())


def test_remove_long_heads_many_moves(device):
    """More holes than a block has threads, movers skipping deleted tail rows."""
    g = torch.Generator().manual_seed(22)
    B, H, S, D, K = 1, 2, 16, 128, 600
    lengths = [1000, 777]
    state = make_state(B, H, pages_for(1000, S), S, D, lengths, torch.bfloat16, device, gen=g)
    run_both("paged_remove_rows_", state, random_rows(lengths, B, H, K, g, pad=0.1).to(device))
    assert_invariant(state)


def test_remove_non_contiguous(device):
    g = torch.Generator().manual_seed(23)
    B, H, S, D = 2, 3, 16, 72
    lengths = random_lengths(B, H, 60, g)
    state = make_state(B, H, 4, S, D, lengths, torch.float32, device, gen=g, layout="strided")
    big = torch.full((B, H, 40), -1, dtype=torch.int32, device=device)
    big[..., ::2] = random_rows(lengths, B, H, 20, g).to(device)
    rows = big[..., ::2]
    assert not rows.is_contiguous()
    run_both("paged_remove_rows_", state, rows)
    assert_invariant(state)


@pytest.mark.parametrize("dtype", DTYPES)
def test_remove_opcheck(device, dtype):
    state = make_state(2, 2, 4, 4, 16, [12, 13, 0, 16], dtype, device)
    # opcheck calls the op several times on the same tensors: each call deletes one row of heads 0, 1 and 3.
    rows = torch.tensor([[[0, -1], [-3, 1]], [[-1, -1], [0, -1]]], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.attngate.paged_remove_rows_.default, (*state.tensors(), rows))


# ---------------------------------------------------------------------------------------------------------
# All ops: no heads
# ---------------------------------------------------------------------------------------------------------


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
    state = make_state(B, H, 3, 4, 16, [], device=device, spare_pages=5)
    run_both(op, state, *_op_args(op, B, H, 16, device))
    state.free_count.fill_(6)
    snap = state.snapshot()
    with attngate_ext.sync_checks(True), pytest.raises(RuntimeError, match=r"free_count must lie in \[0, P\]"):
        getattr(attngate_ext, op)(*state.tensors(), *_op_args(op, B, H, 16, device))
    state.assert_unchanged(snap)


# ---------------------------------------------------------------------------------------------------------
# Chains of ops on one state
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S", [1, 4, 16])
def test_chain_of_ops(device, S):
    """append, compact, remove, append, ... on one state: every step equals the reference's, and every page is
    always either in exactly one head or on the free stack."""
    g = torch.Generator().manual_seed(30 + S)
    B, H, D = 2, 2, 32
    M = pages_for(120, S)
    state = make_state(B, H, M, S, D, random_lengths(B, H, 30, g), torch.bfloat16, device, spare_pages=B * H * M,
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
