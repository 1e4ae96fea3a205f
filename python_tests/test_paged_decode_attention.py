"""paged_decode_attention against the paged reference and a float64 truth.

Tolerance: the op's error against float64 must stay within twice PyTorch's own error at the inputs' precision (SDPA
with the visibility as a boolean mask, the path the model uses today) plus 1e-5.
"""

from __future__ import annotations

import pytest
import torch

import attngate_ext
from attngate_ext import gather_pages, paged_reference

from helpers.devices import sync_if_cuda
from helpers.paged_rows import appended_paged_rows, check_paged_decode, extra_rows, make_paged_rows
from helpers.tensors import DTYPES, randn_strided, random_mask

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [8, 64, 66, 128, 256])
def test_decode_matches_reference(device, dtype, D):
    g = torch.Generator().manual_seed(D)
    group, page_size = {8: (1, 1), 64: (3, 16), 66: (8, 64), 128: (4, 16), 256: (2, 1)}[D]
    lengths = [[0, 17, 40], [5, 64, 33]]
    state = make_paged_rows(lengths, page_size, D, dtype, device, g)
    query = randn_strided((2, 3 * group, D), dtype, device, generator=g)
    check_paged_decode(query, *state, D**-0.5)
    check_paged_decode(query, *state, D**-0.5, *extra_rows(2, 3, 5, D, dtype, device, g))


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 8, 9, 16])
def test_decode_groups_and_page_sizes(device, page_size, group):
    g = torch.Generator().manual_seed(page_size * 100 + group)
    lengths = torch.randint(0, 200, (2, 2), generator=g)
    state = make_paged_rows(lengths, page_size, 64, torch.float32, device, g)
    query = randn_strided((2, 2 * group, 64), torch.float32, device, generator=g)
    check_paged_decode(query, *state, 0.125, *extra_rows(2, 2, 3, 64, torch.float32, device, g))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_long_heads_split_along_length(device, dtype):
    """One or two long heads: the length is split across threads / thread blocks and merged."""
    g = torch.Generator().manual_seed(7)
    state = make_paged_rows([[5000, 1300]], 16, 64, dtype, device, g)
    query = randn_strided((1, 6, 64), dtype, device, generator=g)
    check_paged_decode(query, *state, 0.125)
    check_paged_decode(query, *state, 0.125, *extra_rows(1, 2, 40, 64, dtype, device, g))
    state = make_paged_rows([[3000]], 1, 128, dtype, device, g)  # 3000 pages of one row
    check_paged_decode(randn_strided((1, 8, 128), dtype, device, generator=g), *state, 0.09)


def test_decode_appended_state(device):
    g = torch.Generator().manual_seed(3)
    state = appended_paged_rows(2, 3, 64, [50, 1, 300, 7], 16, torch.bfloat16, device, g)
    query = randn_strided((2, 9, 64), torch.bfloat16, device, generator=g)
    check_paged_decode(query, *state, 0.125, *extra_rows(2, 3, 8, 64, torch.bfloat16, device, g))


def test_decode_extra_rows_only_and_nothing_visible(device):
    """Empty cache: the extra rows alone; a head whose rows are all invalid gives zeros."""
    g = torch.Generator().manual_seed(4)
    key_pages, value_pages, table, lengths = make_paged_rows([[0, 0]], 16, 32, torch.float32, device, g)
    query = randn_strided((1, 4, 32), torch.float32, device, generator=g)
    ek, ev, _ = extra_rows(1, 2, 6, 32, torch.float32, device, g)
    valid = torch.tensor([[[True, False, True, False, False, True], [False] * 6]], device=device)
    out = check_paged_decode(query, key_pages, value_pages, table, lengths, 0.2, ek, ev, valid)
    assert not bool(out[0, 2:].any()) and bool(out[0, :2].abs().sum() > 0)
    out = check_paged_decode(query, key_pages, value_pages, table, lengths, 0.2)
    assert not bool(out.any())
    out = check_paged_decode(query, key_pages, value_pages, table, lengths, 0.2, ek, ev)  # extra_valid None: all seen
    assert bool(out.abs().sum(-1).gt(0).all())


def test_decode_non_contiguous(device):
    g = torch.Generator().manual_seed(5)
    dtype = torch.float16
    state = make_paged_rows([[30, 0, 77], [1, 120, 64]], 16, 72, dtype, device, g, layout="padded")
    key_pages, value_pages, table, lengths = state
    wide = torch.full((2, 3, 2 * table.shape[2]), -1, dtype=torch.int32, device=device)
    wide[:, :, ::2] = table
    lengths_t = lengths.t().contiguous().t()
    query = randn_strided((2, 6, 72), dtype, device, layout="padded", generator=g)
    ek, ev, valid = extra_rows(2, 3, 9, 72, dtype, device, g, layout="swap12")
    valid_t = random_mask((2, 3, 9), 0.5, device, g, layout="transposed")
    assert not (wide[:, :, ::2].is_contiguous() or key_pages.is_contiguous() or query.is_contiguous())
    check_paged_decode(query, key_pages, value_pages, wide[:, :, ::2], lengths_t, 0.1, ek, ev, valid_t)


def test_decode_matches_mask_path(device):
    """The mask path of today's model (grouped_attention over the gathered cache, one query) gives the same."""
    from attngate_ext.gate.masks import grouped_attention

    g = torch.Generator().manual_seed(6)
    key_pages, value_pages, table, lengths = make_paged_rows([[9, 100], [64, 1]], 16, 64, torch.float32, device, g)
    query = randn_strided((2, 6, 64), torch.float32, device, generator=g)
    keys, values, live = gather_pages(key_pages, value_pages, table, lengths)
    masked = grouped_attention(query.unsqueeze(2), keys, values, live.unsqueeze(2), 0.125).squeeze(2)
    out = attngate_ext.paged_decode_attention(query, key_pages, value_pages, table, lengths, 0.125)
    torch.testing.assert_close(out, masked, atol=2e-6, rtol=1e-5)


def test_decode_large_scores_are_stable(device):
    key_pages = torch.full((2, 4, 16), 30.0, device=device)
    value_pages = torch.arange(128, dtype=torch.float32, device=device).view(2, 4, 16)
    table = torch.tensor([[[1, 0]]], dtype=torch.int32, device=device)
    lengths = torch.tensor([[7]], dtype=torch.int32, device=device)
    out = check_paged_decode(torch.full((1, 2, 16), 30.0, device=device), key_pages, value_pages, table, lengths, 1.0)
    assert torch.isfinite(out).all()


def test_decode_is_deterministic(device):
    """The split merge runs in a fixed order: two runs agree bit for bit."""
    g = torch.Generator().manual_seed(8)
    state = make_paged_rows([[4000, 2500, 10]], 16, 128, torch.bfloat16, device, g)
    query = randn_strided((1, 12, 128), torch.bfloat16, device, generator=g)
    a = attngate_ext.paged_decode_attention(query, *state, 0.09)
    b = attngate_ext.paged_decode_attention(query, *state, 0.09)
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_decode_cuda_graph_capture_and_replay():
    if not attngate_ext.cuda_kernels_available():
        pytest.skip("attngate_ext was built without CUDA kernels")
    g = torch.Generator().manual_seed(9)
    full = [[900, 17], [5, 1000]]
    key_pages, value_pages, table, lengths = make_paged_rows(full, 16, 128, torch.bfloat16, "cuda", g)
    lengths.copy_(torch.tensor([[300, 17], [0, 1000]], dtype=torch.int32))
    query = randn_strided((2, 8, 128), torch.bfloat16, "cuda", generator=g)
    ek, ev, valid = extra_rows(2, 2, 4, 128, torch.bfloat16, "cuda", g)
    args = (query, key_pages, value_pages, table, lengths, 0.09, ek, ev, valid)
    attngate_ext.paged_decode_attention(*args)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attngate_ext.paged_decode_attention(*args)
    for step in range(2):  # new values in the captured buffers (longer heads, new query and flags), then replay
        lengths.copy_(torch.tensor(full, dtype=torch.int32) - step)
        query.copy_(randn_strided((2, 8, 128), torch.bfloat16, "cuda", generator=g))
        valid.copy_(~valid)
        graph.replay()
        sync_if_cuda("cuda")
        expected = paged_reference.paged_decode_attention(*args)
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
