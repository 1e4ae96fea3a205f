"""paged_append_kv_ against paged_reference.paged_append_kv_.

Every comparison is exact: lengths, the whole page table (used entries, entries set to -1, untouched entries),
free_count and the whole free stack, the whole pools (so no stray write goes unnoticed) and each head's logical
rows through ``gather_pages``. The reference always runs on CPU copies of the inputs.
"""

from __future__ import annotations

import pytest
import torch

import attngate_ext
from attngate_ext.ops import paged_reference

from helpers.paged_state import (PAGE_SIZES, assert_invariant, assert_same_state, logical_rows, make_paged_state,
                                 pages_for, ragged_lengths, run_both)
from helpers.tensors import DTYPES, randn_strided, random_mask, random_tokens

@pytest.mark.parametrize("S", PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_append_matches_reference(device, dtype, S):
    g = torch.Generator().manual_seed(S)
    B, H, D, T = 2, 3, 64, S + 5  # T > page size: a head takes several pages in one call
    M = pages_for(3 * S + 2 * T, S)
    lengths = ragged_lengths(B, H, 3 * S + 1, g)
    state = make_paged_state(B, H, M, S, D, lengths, dtype, device, spare_pages=B * H * pages_for(T, S) + 1, gen=g)
    key = randn_strided((B, H, T, D), dtype, device, generator=g)
    value = randn_strided((B, H, T, D), dtype, device, generator=g)
    keep = random_mask((B, H, T), 0.6, device, generator=g)
    free_before = int(state.free_count[0])
    run_both("paged_append_kv_", state, key, value, keep)
    assert_invariant(state)
    assert int(state.free_count[0]) < free_before  # pages were really popped


@pytest.mark.parametrize("T", [0, 1, 2, 31, 33, 300])
@pytest.mark.parametrize("with_keep", [True, False])
def test_append_T(device, T, with_keep):
    """T = 0 and 1 (decode), around one warp of flags, and more rows than a copy chunk."""
    g = torch.Generator().manual_seed(T)
    B, H, S, D = 3, 2, 16, 128
    lengths = ragged_lengths(B, H, 40, g)
    state = make_paged_state(B, H, pages_for(40 + T, S), S, D, lengths, torch.bfloat16, device,
                             spare_pages=B * H * (pages_for(T, S) + 1), gen=g)
    key = randn_strided((B, H, T, D), torch.bfloat16, device, generator=g)
    value = randn_strided((B, H, T, D), torch.bfloat16, device, generator=g)
    keep = random_mask((B, H, T), 0.5, device, generator=g) if with_keep else None
    run_both("paged_append_kv_", state, key, value, keep)
    assert_invariant(state)


@pytest.mark.parametrize("case", ["nothing_kept", "everything_kept", "all_empty", "fill_table_exactly", "pool_exact"])
def test_append_edge_cases(device, case):
    g = torch.Generator().manual_seed(7)
    B, H, S, D, T, M = 2, 2, 4, 16, 6, 4
    lengths = [0, 0, 0, 0] if case == "all_empty" else [3, 4, 0, 10]
    if case == "fill_table_exactly":
        lengths = [M * S - T] * 4
    spare = 0 if case == "pool_exact" else 12
    if case == "pool_exact":  # exactly the pages the append needs
        spare = sum(pages_for(n + T, S) - pages_for(n, S) for n in lengths)
    state = make_paged_state(B, H, M, S, D, lengths, torch.float16, device, spare_pages=spare, gen=g)
    key = randn_strided((B, H, T, D), torch.float16, device, generator=g)
    value = randn_strided((B, H, T, D), torch.float16, device, generator=g)
    keep = {"nothing_kept": torch.zeros(B, H, T, dtype=torch.bool, device=device)}.get(
        case, torch.ones(B, H, T, dtype=torch.bool, device=device))
    run_both("paged_append_kv_", state, key, value, keep)
    assert_invariant(state)
    if case == "pool_exact":
        assert int(state.free_count[0]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_append_non_contiguous(device, dtype):
    """Strided pools, page table, lengths and free stack; NHD key/value; a transposed keep mask."""
    g = torch.Generator().manual_seed(5)
    B, H, S, D, T = 2, 3, 16, 72, 21
    lengths = ragged_lengths(B, H, 50, g)
    state = make_paged_state(B, H, 6, S, D, lengths, dtype, device, spare_pages=12, gen=g, layout="strided")
    key = randn_strided((B, H, T, D), dtype, device, layout="swap12", generator=g)
    value = randn_strided((B, H, T, D), dtype, device, layout="padded", generator=g)
    keep = random_mask((B, H, T), 0.7, device, generator=g, layout="transposed")
    assert not (key.is_contiguous() or value.is_contiguous() or keep.is_contiguous())
    run_both("paged_append_kv_", state, key, value, keep)
    assert_invariant(state)


def test_append_unaligned_rows(device):
    """Rows whose start is not 16-byte aligned (odd D, pool at an odd element offset): the scalar path."""
    g = torch.Generator().manual_seed(8)
    B, H, S, D, T = 2, 2, 16, 24, 5
    state = make_paged_state(B, H, 4, S, D, [5, 0, 17, 16], torch.float16, device, gen=g)
    buf = torch.randn(state.key_pages.numel() + 1, dtype=torch.float16, device=device)
    state.key_pages = buf[1:].view(state.key_pages.shape).copy_(state.key_pages)
    key = randn_strided((B, H, T, D), torch.float16, device, generator=g)
    run_both("paged_append_kv_", state, key, key.clone(), None)


def test_decode_steps_equal_one_append(device):
    """T = 1 appends step by step hold the same logical rows as one append of all T (page ids may differ)."""
    g = torch.Generator().manual_seed(9)
    B, H, S, D, T = 2, 2, 4, 32, 13
    key, value, keep = random_tokens((B, H, T, D), torch.bfloat16, device, 0.6, generator=g)
    lengths = [2, 0, 5, 9]
    steps = make_paged_state(B, H, 8, S, D, lengths, torch.bfloat16, device, spare_pages=20,
                             gen=torch.Generator().manual_seed(1))
    whole = steps.to(device)
    for t in range(T):
        run_both("paged_append_kv_", steps, key[:, :, t : t + 1], value[:, :, t : t + 1], keep[:, :, t : t + 1])
    attngate_ext.paged_append_kv_(*whole.tensors(), key, value, keep)
    assert torch.equal(steps.lengths, whole.lengths)
    for a, b in zip(logical_rows(steps), logical_rows(whole)):
        assert torch.equal(a, b)
    assert_invariant(steps)
    assert_invariant(whole)


@pytest.mark.parametrize("dtype", DTYPES)
def test_append_opcheck(device, dtype):
    B, H, S, D, T = 2, 2, 4, 16, 3
    state = make_paged_state(B, H, 16, S, D, [1, 4, 0, 7], dtype, device, spare_pages=48)
    key = torch.randn(B, H, T, D, device=device, dtype=dtype)
    value = torch.randn(B, H, T, D, device=device, dtype=dtype)
    keep = torch.rand(B, H, T, device=device) > 0.5
    op = torch.ops.attngate.paged_append_kv_.default
    # opcheck runs the op several times on copies; each run only needs enough free pages, which spare_pages gives.
    torch.library.opcheck(op, (*state.tensors(), key, value, keep))
    torch.library.opcheck(op, (*state.tensors(), key, value, None))


@pytest.mark.skipif(not torch.cuda.is_available() or not attngate_ext.cuda_kernels_available(),
                    reason="CUDA graphs need a CUDA device and the CUDA kernels")
def test_decode_append_cuda_graph_replay():
    """A decode-time append captured once and replayed: pages are popped on the device at every replay."""
    g = torch.Generator().manual_seed(3)
    B, H, S, D, steps = 2, 4, 4, 128, 9
    lengths = [0, 1, 2, 3, 4, 5, 6, 7]
    state = make_paged_state(B, H, 8, S, D, lengths, torch.bfloat16, "cuda", spare_pages=24, gen=g)
    ref = state.to("cpu")
    key = torch.zeros(B, H, 1, D, dtype=torch.bfloat16, device="cuda")
    value = torch.zeros_like(key)
    keep = torch.zeros(B, H, 1, dtype=torch.bool, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the side stream (allocator, module load), then restore the state
        warm = state.to("cuda")
        attngate_ext.paged_append_kv_(*warm.tensors(), key, value, keep)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attngate_ext.paged_append_kv_(*state.tensors(), key, value, keep)
    # Capture does not run the op: the state is still the initial one.
    assert_same_state(state, ref)
    for _ in range(steps):
        k = torch.randn(B, H, 1, D, generator=g).to(torch.bfloat16)
        v = torch.randn(B, H, 1, D, generator=g).to(torch.bfloat16)
        m = torch.rand(B, H, 1, generator=g) < 0.7
        key.copy_(k), value.copy_(v), keep.copy_(m)
        graph.replay()
        paged_reference.paged_append_kv_(*ref.tensors(), k, v, m)
        assert_same_state(state, ref)
    assert_invariant(state)
