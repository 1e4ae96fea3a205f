"""Paged rows for the paged attention tests (the pages, page table and lengths, no free stack: attention only reads
them), and the decode check against a float64 truth with PyTorch's own error at the inputs' precision as the
tolerance (twice it, plus 1e-5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import attngate_ext
from attngate_ext import gather_pages, paged_reference

from helpers.tensors import random_mask, randn_strided


def make_paged_rows(lengths, page_size, D, dtype, device, gen, spare_pages=2, layout="contiguous"):
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


def appended_paged_rows(B, H, D, chunks, page_size, dtype, device, gen, keep_ratio=0.6):
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


def check_paged_decode(*args, **kwargs):
    out = attngate_ext.paged_decode_attention(*args, **kwargs)
    query = args[0]
    assert out.dtype == query.dtype and out.shape == query.shape and out.is_contiguous()
    exact = decode_truth(*args, **kwargs)
    torch_err = max_err(decode_torch(*args, **kwargs), exact)
    assert max_err(out, exact) <= 2 * torch_err + 1e-5, (max_err(out, exact), torch_err)
    ref = paged_reference.paged_decode_attention(*args, **kwargs)
    assert max_err(out, ref) <= 2 * torch_err + 1e-5, (max_err(out, ref), torch_err)
    return out


def extra_rows(B, H, E, D, dtype, device, gen, layout="contiguous", valid_ratio=0.6):
    return (randn_strided((B, H, E, D), dtype, device, layout, gen),
            randn_strided((B, H, E, D), dtype, device, layout, gen),
            random_mask((B, H, E), valid_ratio, device, gen))
