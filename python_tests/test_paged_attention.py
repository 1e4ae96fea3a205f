"""paged_decode_attention against the paged reference and a float64 truth, and the helpers of the paged attention tests.

Tolerance: the op's error against float64 must stay within twice PyTorch's own error at the inputs' precision (SDPA
with the visibility as a boolean mask, the path the model uses today) plus 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attngate_ext
from attngate_ext import gather_pages, paged_reference

from conftest import DTYPES, random_mask, randn_strided, sync_if_cuda

# ---------------------------------------------------------------------------------------------------------
# Paged states.
# ---------------------------------------------------------------------------------------------------------


def make_state(lengths, page_size, D, dtype, device, gen, spare_pages=2, layout="contiguous"):
    """A paged cache of random rows: each head owns ceil(len / S) shuffled page ids, -1 after them, plus spares."""
    lengths = torch.as_tensor(lengths, dtype=torch.int32)
    B, H = lengths.shape
    need = (lengths.long() + page_size - 1) // page_size
    M = int(need.max()) + 1 if need.numel() else 1
    P = int(need.sum()) + spare_pages
    ids = torch.randperm(P, generator=gen).to(torch.int32)
    table = torch.full((B, H, M), -1, dtype=torch.int32)
    i = 0
    for b in range(B):
        for h in range(H):
            n = int(need[b, h])
            table[b, h, :n] = ids[i:i + n]
            i += n
    key_pages = randn_strided((P, page_size, D), dtype, device, layout, gen)
    value_pages = randn_strided((P, page_size, D), dtype, device, layout, gen)
    return key_pages, value_pages, table.to(device), lengths.to(device)


def appended_state(B, H, D, chunks, page_size, dtype, device, gen, keep_ratio=0.6):
    """A paged cache built the way the model builds it: paged_append_kv_ (reference) of random chunks, keeping
    each token with probability keep_ratio; page ids come off a shuffled free stack."""
    total = sum(chunks)
    per_head = (total + page_size - 1) // page_size
    P = B * H * per_head + 3
    key_pages = torch.zeros(P, page_size, D, dtype=dtype)
    value_pages = torch.zeros(P, page_size, D, dtype=dtype)
    table = torch.full((B, H, per_head), -1, dtype=torch.int32)
    lengths = torch.zeros(B, H, dtype=torch.int32)
    free = torch.randperm(P, generator=gen).to(torch.int32)
    free_count = torch.tensor([P], dtype=torch.int32)
    for T in chunks:
        key = torch.randn(B, H, T, D, generator=gen).to(dtype)
        value = torch.randn(B, H, T, D, generator=gen).to(dtype)
        keep = torch.rand(B, H, T, generator=gen) < keep_ratio
        paged_reference.paged_append_kv_(key_pages, value_pages, table, lengths, free, free_count, key, value, keep)
    return key_pages.to(device), value_pages.to(device), table.to(device), lengths.to(device)


# ---------------------------------------------------------------------------------------------------------
# Decode: float64 truth and PyTorch at the inputs' precision.
# ---------------------------------------------------------------------------------------------------------


def _decode_rows(key_pages, value_pages, page_table, lengths, extra_key, extra_value, extra_valid):
    keys, values, live = gather_pages(key_pages, value_pages, page_table, lengths)
    if extra_key is not None:
        B, H, E, _ = extra_key.shape
        valid = extra_valid if extra_valid is not None else torch.ones(B, H, E, dtype=torch.bool, device=live.device)
        keys, values = torch.cat([keys, extra_key], 2), torch.cat([values, extra_value], 2)
        live = torch.cat([live, valid], 2)
    return keys, values, live


def decode_truth(query, key_pages, value_pages, page_table, lengths, scale, extra_key=None, extra_value=None,
                 extra_valid=None):
    """float64 softmax over the visible rows; zeros where none is visible."""
    keys, values, live = _decode_rows(key_pages, value_pages, page_table, lengths, extra_key, extra_value, extra_valid)
    group = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, 1)
    v = values.double().repeat_interleave(group, 1)
    vis = live.repeat_interleave(group, 1)
    scores = torch.einsum("bqd,bqnd->bqn", query.double(), k) * scale
    probs = torch.softmax(scores.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("bqn,bqnd->bqd", probs, v)


def decode_torch(query, key_pages, value_pages, page_table, lengths, scale, extra_key=None, extra_value=None,
                 extra_valid=None):
    """SDPA at the inputs' precision with the visibility as a boolean mask (zeros where none is visible)."""
    keys, values, live = _decode_rows(key_pages, value_pages, page_table, lengths, extra_key, extra_value, extra_valid)
    group = query.shape[1] // keys.shape[1]
    vis = live.repeat_interleave(group, 1)
    if keys.shape[2] == 0:
        return torch.zeros_like(query)
    out = F.scaled_dot_product_attention(query.unsqueeze(2), keys.repeat_interleave(group, 1),
                                         values.repeat_interleave(group, 1), attn_mask=vis.unsqueeze(2),
                                         scale=scale).squeeze(2)
    return torch.where(vis.any(-1, keepdim=True), out.nan_to_num(0.0), torch.zeros_like(out))


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_decode(*args, **kwargs):
    out = attngate_ext.paged_decode_attention(*args, **kwargs)
    query = args[0]
    assert out.dtype == query.dtype and out.shape == query.shape and out.is_contiguous()
    exact = decode_truth(*args, **kwargs)
    torch_err = max_err(decode_torch(*args, **kwargs), exact)
    assert max_err(out, exact) <= 2 * torch_err + 1e-5, (max_err(out, exact), torch_err)
    ref = paged_reference.paged_decode_attention(*args, **kwargs)
    assert max_err(out, ref) <= 2 * torch_err + 1e-5, (max_err(out, ref), torch_err)
    return out


def _extra(B, H, E, D, dtype, device, gen, layout="contiguous", valid_ratio=0.6):
    return (randn_strided((B, H, E, D), dtype, device, layout, gen), randn_strided((B, H, E, D), dtype, device, layout, gen),
            random_mask((B, H, E), valid_ratio, device, gen))


# ---------------------------------------------------------------------------------------------------------
# Decode tests.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [8, 64, 66, 128, 256])
def test_decode_matches_reference(device, dtype, D):
    g = torch.Generator().manual_seed(D)
    group, page_size = {8: (1, 1), 64: (3, 16), 66: (8, 64), 128: (4, 16), 256: (2, 1)}[D]
    lengths = [[0, 17, 40], [5, 64, 33]]
    state = make_state(lengths, page_size, D, dtype, device, g)
    query = randn_strided((2, 3 * group, D), dtype, device, generator=g)
    check_decode(query, *state, D**-0.5)
    check_decode(query, *state, D**-0.5, *_extra(2, 3, 5, D, dtype, device, g))


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 8, 9, 16])
def test_decode_groups_and_page_sizes(device, page_size, group):
    g = torch.Generator().manual_seed(page_size * 100 + group)
    lengths = torch.randint(0, 200, (2, 2), generator=g)
    state = make_state(lengths, page_size, 64, torch.float32, device, g)
    query = randn_strided((2, 2 * group, 64), torch.float32, device, generator=g)
    check_decode(query, *state, 0.125, *_extra(2, 2, 3, 64, torch.float32, device, g))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_long_heads_split_along_length(device, dtype):
    """One or two long heads: the length is split across threads / thread blocks and merged."""
    g = torch.Generator().manual_seed(7)
    state = make_state([[5000, 1300]], 16, 64, dtype, device, g)
    query = randn_strided((1, 6, 64), dtype, device, generator=g)
    check_decode(query, *state, 0.125)
    check_decode(query, *state, 0.125, *_extra(1, 2, 40, 64, dtype, device, g))
    state = make_state([[3000]], 1, 128, dtype, device, g)  # 3000 pages of one row
    check_decode(randn_strided((1, 8, 128), dtype, device, generator=g), *state, 0.09)


def test_decode_appended_state(device):
    g = torch.Generator().manual_seed(3)
    state = appended_state(2, 3, 64, [50, 1, 300, 7], 16, torch.bfloat16, device, g)
    query = randn_strided((2, 9, 64), torch.bfloat16, device, generator=g)
    check_decode(query, *state, 0.125, *_extra(2, 3, 8, 64, torch.bfloat16, device, g))


def test_decode_extra_rows_only_and_nothing_visible(device):
    """Empty cache: the extra rows alone; a head whose rows are all invalid gives zeros."""
    g = torch.Generator().manual_seed(4)
    key_pages, value_pages, table, lengths = make_state([[0, 0]], 16, 32, torch.float32, device, g)
    query = randn_strided((1, 4, 32), torch.float32, device, generator=g)
    ek, ev, _ = _extra(1, 2, 6, 32, torch.float32, device, g)
    valid = torch.tensor([[[True, False, True, False, False, True], [False] * 6]], device=device)
    out = check_decode(query, key_pages, value_pages, table, lengths, 0.2, ek, ev, valid)
    assert not bool(out[0, 2:].any()) and bool(out[0, :2].abs().sum() > 0)
    out = check_decode(query, key_pages, value_pages, table, lengths, 0.2)
    assert not bool(out.any())
    out = check_decode(query, key_pages, value_pages, table, lengths, 0.2, ek, ev)  # extra_valid None: all visible
    assert bool(out.abs().sum(-1).gt(0).all())


def test_decode_non_contiguous(device):
    g = torch.Generator().manual_seed(5)
    dtype = torch.float16
    state = make_state([[30, 0, 77], [1, 120, 64]], 16, 72, dtype, device, g, layout="padded")
    key_pages, value_pages, table, lengths = state
    wide = torch.full((2, 3, 2 * table.shape[2]), -1, dtype=torch.int32, device=device)
    wide[:, :, ::2] = table
    lengths_t = lengths.t().contiguous().t()
    query = randn_strided((2, 6, 72), dtype, device, layout="padded", generator=g)
    ek, ev, valid = _extra(2, 3, 9, 72, dtype, device, g, layout="swap12")
    valid_t = random_mask((2, 3, 9), 0.5, device, g, layout="transposed")
    assert not (wide[:, :, ::2].is_contiguous() or key_pages.is_contiguous() or query.is_contiguous())
    check_decode(query, key_pages, value_pages, wide[:, :, ::2], lengths_t, 0.1, ek, ev, valid_t)


def test_decode_matches_mask_path(device):
    """The mask path of today's model (grouped_attention over the gathered cache, one query) gives the same."""
    from attngate_ext.gate.masks import grouped_attention

    g = torch.Generator().manual_seed(6)
    key_pages, value_pages, table, lengths = make_state([[9, 100], [64, 1]], 16, 64, torch.float32, device, g)
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
    out = check_decode(torch.full((1, 2, 16), 30.0, device=device), key_pages, value_pages, table, lengths, 1.0)
    assert torch.isfinite(out).all()


def test_decode_is_deterministic(device):
    """The split merge runs in a fixed order: two runs agree bit for bit."""
    g = torch.Generator().manual_seed(8)
    state = make_state([[4000, 2500, 10]], 16, 128, torch.bfloat16, device, g)
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
    key_pages, value_pages, table, lengths = make_state(full, 16, 128, torch.bfloat16, "cuda", g)
    lengths.copy_(torch.tensor([[300, 17], [0, 1000]], dtype=torch.int32))
    query = randn_strided((2, 8, 128), torch.bfloat16, "cuda", generator=g)
    ek, ev, valid = _extra(2, 2, 4, 128, torch.bfloat16, "cuda", g)
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
