"""paged_compact_kv_ against its reference: lengths, whole page table (-1 on freed entries), whole free stack, whole
pools and logical rows, all exact."""

from __future__ import annotations

import pytest
import torch

from helpers.paged_state import PAGE_SIZES, assert_invariant, make_paged_state, pages_for, ragged_lengths, run_both
from helpers.tensors import DTYPES, random_mask

@pytest.mark.parametrize("S", PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_matches_reference(device, dtype, S):
    g = torch.Generator().manual_seed(10 + S)
    B, H, D = 2, 3, 64
    top = 5 * S + 3  # heads spanning several pages
    lengths = ragged_lengths(B, H, top, g)
    state = make_paged_state(B, H, pages_for(top, S) + 1, S, D, lengths, dtype, device, gen=g)
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
    state = make_paged_state(B, H, 5, S, D, lengths, torch.float32, device, gen=g)
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
    state = make_paged_state(B, H, pages_for(700, S), S, D, lengths, torch.bfloat16, device, gen=g)
    keep = random_mask((B, H, 700), 0.3, device, generator=g)
    keep[0, 0, :300] = True  # a long prefix that stays in place
    run_both("paged_compact_kv_", state, keep)
    assert_invariant(state)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_non_contiguous(device, dtype):
    g = torch.Generator().manual_seed(13)
    B, H, S, D = 2, 3, 16, 72
    lengths = ragged_lengths(B, H, 70, g)
    state = make_paged_state(B, H, 5, S, D, lengths, dtype, device, gen=g, layout="strided")
    keep = random_mask((B, H, 75), 0.5, device, generator=g, layout="transposed")
    assert not keep.is_contiguous()
    run_both("paged_compact_kv_", state, keep)
    assert_invariant(state)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_opcheck(device, dtype):
    state = make_paged_state(2, 2, 4, 4, 16, [3, 9, 0, 16], dtype, device)
    keep = torch.rand(2, 2, 16, device=device) > 0.5
    torch.library.opcheck(torch.ops.attngate.paged_compact_kv_.default, (*state.tensors(), keep))
