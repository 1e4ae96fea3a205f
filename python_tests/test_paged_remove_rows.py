"""paged_remove_rows_ against its reference: lengths, whole page table (-1 on freed entries), whole free stack, whole
pools and logical rows, all exact."""

from __future__ import annotations

import pytest
import torch

from helpers.paged_state import (PAGE_SIZES, assert_invariant, make_paged_state, pages_for, ragged_lengths, random_rows,
                                 run_both)
from helpers.tensors import DTYPES

@pytest.mark.parametrize("dtype", DTYPES)
def test_remove_opcheck(device, dtype):
    state = make_paged_state(2, 2, 4, 4, 16, [12, 13, 0, 16], dtype, device)
    # opcheck calls the op several times on the same tensors: each call deletes one row of heads 0, 1 and 3.
    rows = torch.tensor([[[0, -1], [-3, 1]], [[-1, -1], [0, -1]]], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.attngate.paged_remove_rows_.default, (*state.tensors(), rows))


@pytest.mark.parametrize("S", PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_remove_matches_reference(device, dtype, S):
    g = torch.Generator().manual_seed(20 + S)
    B, H, D, K = 2, 3, 64, 2 * S + 3  # enough deletions to empty whole pages
    top = 4 * S + 5
    lengths = ragged_lengths(B, H, top, g)
    state = make_paged_state(B, H, pages_for(top, S), S, D, lengths, dtype, device, gen=g)
    rows = random_rows(lengths, B, H, K, g).to(device)
    run_both("paged_remove_rows_", state, rows)
    assert_invariant(state)


@pytest.mark.parametrize("case", ["K0", "all_negative", "remove_all", "tail_only", "holes_only", "one_row",
                                  "strided_rows"])
def test_remove_edge_cases(device, case):
    g = torch.Generator().manual_seed(21)
    B, H, S, D = 2, 2, 4, 16
    lengths = [9, 0, 5, 16]
    state = make_paged_state(B, H, 4, S, D, lengths, torch.float16, device, gen=g)
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
    state = make_paged_state(B, H, pages_for(1000, S), S, D, lengths, torch.bfloat16, device, gen=g)
    run_both("paged_remove_rows_", state, random_rows(lengths, B, H, K, g, pad=0.1).to(device))
    assert_invariant(state)


def test_remove_non_contiguous(device):
    g = torch.Generator().manual_seed(23)
    B, H, S, D = 2, 3, 16, 72
    lengths = ragged_lengths(B, H, 60, g)
    state = make_paged_state(B, H, 4, S, D, lengths, torch.float32, device, gen=g, layout="strided")
    big = torch.full((B, H, 40), -1, dtype=torch.int32, device=device)
    big[..., ::2] = random_rows(lengths, B, H, 20, g).to(device)
    rows = big[..., ::2]
    assert not rows.is_contiguous()
    run_both("paged_remove_rows_", state, rows)
    assert_invariant(state)
