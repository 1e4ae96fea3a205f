"""paged_prefill_attention against the paged reference and the mask path (grouped_attention + block_visibility over
the gathered cache) in float64, with PyTorch's own error at the inputs' precision as the tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attngate_ext
from attngate_ext import gather_pages, paged_reference
from attngate_ext.gate.masks import block_visibility, grouped_attention

from helpers.paged_rows import appended_paged_rows, make_paged_rows, max_err
from helpers.tensors import DTYPES, randn_strided, random_mask

NAMES = ["query", "key_pages", "value_pages", "page_table", "lengths", "key", "value", "keep", "valid", "window",
         "scale", "extra_key", "extra_value", "extra_until"]


def mask_path(a, dtype):
    """Keys, values and visibility (B, H, T, N) of the rule as dense tensors, and grouped_attention over them."""
    query, key = a["query"], a["key"]
    B, _, T, _ = query.shape
    H = key.shape[1]
    cached_k, cached_v, live = gather_pages(a["key_pages"], a["value_pages"], a["page_table"], a["lengths"])
    ks, vs, vis = [cached_k], [cached_v], [live.unsqueeze(2).expand(B, H, T, live.shape[2])]
    if a.get("extra_key") is not None:
        E = a["extra_key"].shape[2]
        until = a.get("extra_until")
        until = until.long() if until is not None else torch.full((B, H, E), T, device=key.device)
        ks.append(a["extra_key"])
        vs.append(a["extra_value"])
        vis.append(until.unsqueeze(2) >= torch.arange(T, device=key.device).view(1, 1, T, 1))
    ks.append(key)
    vs.append(a["value"])
    vis.append(block_visibility(a["keep"], a["valid"], a["window"]))
    k, v, visible = torch.cat(ks, 2).to(dtype), torch.cat(vs, 2).to(dtype), torch.cat(vis, 3)
    return grouped_attention(query.to(dtype), k, v, visible, a["scale"])


def check_prefill(a):
    out = attngate_ext.paged_prefill_attention(**a)
    query = a["query"]
    assert out.dtype == query.dtype and out.shape == query.shape and out.is_contiguous()
    exact = mask_path(a, torch.float64)
    torch_err = max_err(mask_path(a, query.dtype), exact)
    assert max_err(out, exact) <= 2 * torch_err + 1e-5, (max_err(out, exact), torch_err)
    ref = paged_reference.paged_prefill_attention(**a)
    assert max_err(out, ref) <= 2 * torch_err + 1e-5, (max_err(out, ref), torch_err)
    return out


def inputs(device, gen, *, B=2, H=2, group=2, T=17, D=32, dtype=torch.float32, lengths=None, page_size=16,
           keep_ratio=0.5, valid="random", window=3, E=0, until="random", layout="contiguous", state=None):
    """Arguments of paged_prefill_attention (a dict); valid is "none", "random" or "left" (left padding)."""
    if state is None:
        lengths = lengths if lengths is not None else torch.randint(0, 90, (B, H), generator=gen)
        state = make_paged_rows(lengths, page_size, D, dtype, device, gen, layout="padded" if layout != "contiguous" else layout)
    a = dict(zip(NAMES[1:5], state))
    a["query"] = randn_strided((B, H * group, T, D), dtype, device, layout, gen)
    a["key"] = randn_strided((B, H, T, D), dtype, device, layout, gen)
    a["value"] = randn_strided((B, H, T, D), dtype, device, layout, gen)
    a["keep"] = random_mask((B, H, T), keep_ratio, device, gen, "transposed" if layout != "contiguous" else "contiguous")
    if valid == "random":
        a["valid"] = random_mask((B, T), 0.8, device, gen)
    elif valid == "left":
        pad = torch.randint(0, T, (B, 1), generator=gen)
        a["valid"] = (torch.arange(T).view(1, T) >= pad).to(device)
    else:
        a["valid"] = None
    a["window"], a["scale"] = window, D**-0.5
    if E:
        a["extra_key"] = randn_strided((B, H, E, D), dtype, device, layout, gen)
        a["extra_value"] = randn_strided((B, H, E, D), dtype, device, layout, gen)
        if until == "random":  # -1 (seen by nobody) up to T + 1 (seen by every query)
            a["extra_until"] = torch.randint(-1, T + 2, (B, H, E), generator=gen, dtype=torch.int32).to(device)
    return a


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [8, 64, 66, 128, 256])
def test_prefill_matches_reference(device, dtype, D):
    g = torch.Generator().manual_seed(D)
    group, page_size, T = {8: (1, 1, 130), 64: (3, 16, 17), 66: (8, 64, 17), 128: (4, 16, 130), 256: (2, 1, 17)}[D]
    check_prefill(inputs(device, g, group=group, T=T, D=D, dtype=dtype, page_size=page_size, E=5))


@pytest.mark.parametrize("window", [1, 4, 1000])
@pytest.mark.parametrize("valid", ["none", "random", "left"])
@pytest.mark.parametrize("until", ["none", "random"])
def test_prefill_rule(device, window, valid, until):
    g = torch.Generator().manual_seed(window * 7 + len(valid) + len(until))
    check_prefill(inputs(device, g, T=130, window=window, valid=valid, E=7, until=until))


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("group", [1, 2, 3, 8, 9, 16])
def test_prefill_groups_and_page_sizes(device, page_size, group):
    g = torch.Generator().manual_seed(page_size * 100 + group)
    check_prefill(inputs(device, g, group=group, T=17, D=64, page_size=page_size, E=3))


@pytest.mark.parametrize("T", [1, 2, 17])
def test_prefill_short_chunk_long_cache(device, T):
    """Few queries over a long cache: the key stream is split (CPU threads, CUDA blocks) and merged."""
    g = torch.Generator().manual_seed(T)
    check_prefill(inputs(device, g, B=1, H=1, group=3, T=T, D=64, lengths=[[3000]], E=4, dtype=torch.bfloat16))
    check_prefill(inputs(device, g, B=1, H=2, group=1, T=T, D=128, lengths=[[700, 0]], page_size=1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_appended_state(device, dtype):
    """A cache built by paged_append_kv_ (reference) of earlier chunks under random keep flags."""
    g = torch.Generator().manual_seed(11)
    state = appended_paged_rows(2, 3, 64, [40, 200, 3], 16, dtype, device, g)
    check_prefill(inputs(device, g, B=2, H=3, group=3, T=130, D=64, dtype=dtype, state=state, E=8, window=16))


def test_prefill_empty_cache(device):
    g = torch.Generator().manual_seed(12)
    check_prefill(inputs(device, g, T=130, lengths=[[0, 0], [0, 0]], E=5))
    # No pages at all: P = 0, M = 0.
    state = (torch.zeros(0, 16, 32, device=device), torch.zeros(0, 16, 32, device=device),
             torch.zeros(2, 2, 0, dtype=torch.int32, device=device), torch.zeros(2, 2, dtype=torch.int32, device=device))
    check_prefill(inputs(device, g, T=33, state=state))


def test_prefill_dense_chunk_is_causal_attention(device):
    """Empty cache, every token kept, no padding: plain causal attention."""
    g = torch.Generator().manual_seed(13)
    a = inputs(device, g, B=1, H=2, group=4, T=130, D=64, lengths=[[0, 0]], keep_ratio=1.0, valid="none")
    out = attngate_ext.paged_prefill_attention(**a)
    causal = F.scaled_dot_product_attention(a["query"], a["key"], a["value"], is_causal=True, scale=a["scale"],
                                            enable_gqa=True)
    torch.testing.assert_close(out, causal, atol=2e-6, rtol=1e-5)


def test_prefill_all_evicted_window_one_sees_itself(device):
    """Nothing kept, window 1, empty cache, no extra rows: every query sees only itself, so out = its value."""
    g = torch.Generator().manual_seed(14)
    a = inputs(device, g, B=2, H=2, group=3, T=40, lengths=[[0, 0], [0, 0]], keep_ratio=0.0, window=1)
    out = attngate_ext.paged_prefill_attention(**a)
    torch.testing.assert_close(out, a["value"].repeat_interleave(3, dim=1), atol=1e-6, rtol=0)


def test_prefill_non_contiguous(device):
    g = torch.Generator().manual_seed(15)
    a = inputs(device, g, T=50, D=72, dtype=torch.bfloat16, layout="swap12", E=6)
    table = a["page_table"]
    wide = torch.full((*table.shape[:2], 2 * table.shape[2]), 7, dtype=torch.int32, device=device)
    wide[:, :, ::2] = table
    a["page_table"] = wide[:, :, ::2]
    a["valid"] = random_mask((a["query"].shape[0], 50), 0.8, device, g, layout="transposed")
    a["extra_until"] = a["extra_until"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not (a["query"].is_contiguous() or a["key"].is_contiguous() or a["key_pages"].is_contiguous()
                or a["keep"].is_contiguous() or a["page_table"].is_contiguous())
    check_prefill(a)


def test_prefill_large_values_are_stable(device):
    g = torch.Generator().manual_seed(16)
    a = inputs(device, g, T=20, lengths=[[5, 9], [0, 30]], E=3)
    for name in ("query", "key", "key_pages", "extra_key"):
        a[name] = a[name] * 40
    out = check_prefill(a)
    assert torch.isfinite(out).all()


def test_prefill_is_deterministic(device):
    g = torch.Generator().manual_seed(17)
    a = inputs(device, g, B=1, H=1, group=2, T=3, D=128, lengths=[[5000]], dtype=torch.float16, E=9)
    assert torch.equal(attngate_ext.paged_prefill_attention(**a), attngate_ext.paged_prefill_attention(**a))
