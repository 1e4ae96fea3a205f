"""Every path of the paged kernels at small sizes, as CPU/CUDA twins against the pure-PyTorch references: what
compute-sanitizer (memcheck, racecheck, synccheck) runs on a GPU machine, so each case stays small.

Paths: one-launch and multi-launch appends, keep given or not; 16-byte and scalar rows (D = 64 / 66); compaction of
one and of several chunks; row removal; decode attention with GQA tiles of 1-8 query heads, wide heads, extra rows
and several splits per head; prefill attention with extra rows and the window; the fused decode step with and
without ring_keep."""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch

import attngate_ext
from attngate_ext import gather_pages
from attngate_ext.ops import paged_reference

NAMES = ("key_pages", "value_pages", "page_table", "lengths", "free_pages", "free_count")
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _state(B: int, H: int, S: int, D: int, lengths: List[int], dtype, device, spare: int = 8, seed: int = 0,
           room: int = 0) -> Dict[str, torch.Tensor]:
    """Heads holding lengths[b * H + h] random rows in random pages, the other pages free; `room` more rows fit in
    every head's page-table row."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // S) for n in lengths]
    M = max(-(-(n + room) // S) for n in lengths) if lengths else 1
    P = sum(pages) + spare
    perm = torch.randperm(P, generator=g).to(torch.int32)
    table = torch.full((B, H, max(M, 1)), -1, dtype=torch.int32)
    at = 0
    for bh, k in enumerate(pages):
        table[bh // H, bh % H, :k] = perm[at : at + k]
        at += k
    free = torch.zeros(P, dtype=torch.int32)
    free[: P - at] = perm[at:]
    state = {
        "key_pages": torch.randn(P, S, D, generator=g).to(dtype), "value_pages": torch.randn(P, S, D, generator=g).to(dtype),
        "page_table": table, "lengths": torch.tensor(lengths, dtype=torch.int32).view(B, H), "free_pages": free,
        "free_count": torch.tensor([P - at], dtype=torch.int32),
    }
    return {k: v.to(device) for k, v in state.items()}


def _cpu(state):
    return {k: v.cpu().clone() for k, v in state.items()}


def _args(state):
    return [state[n] for n in NAMES]


def _assert_same_rows(got, want) -> None:
    if got["key_pages"].is_cuda:
        torch.cuda.synchronize()
    assert torch.equal(got["lengths"].cpu(), want["lengths"])
    assert torch.equal(got["free_count"].cpu(), want["free_count"])
    for a, b in zip(gather_pages(*(got[n].cpu() for n in NAMES[:4])), gather_pages(*(want[n] for n in NAMES[:4]))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("T", [1, 32, 33, 300])  # one launch up to 32 rows, three launches past it
@pytest.mark.parametrize("D,dtype", [(64, torch.bfloat16), (66, torch.float32)])  # 16-byte / scalar rows
@pytest.mark.parametrize("with_keep", [True, False])
def test_append_paths(device, T, D, dtype, with_keep):
    B, H, S = 2, 3, 16
    state = _state(B, H, S, D, [0, 5, 16, 17, 31, 2], dtype, device, spare=2 * B * H * (T // S + 2), room=T)
    want = _cpu(state)
    g = torch.Generator().manual_seed(T)
    key = torch.randn(B, H, T, D, generator=g).to(dtype)
    value = torch.randn(B, H, T, D, generator=g).to(dtype)
    keep = torch.rand(B, H, T, generator=g) < 0.6 if with_keep else None
    paged_reference.paged_append_kv_(*_args(want), key, value, keep)
    attngate_ext.paged_append_kv_(*_args(state), key.to(device), value.to(device),
                                  None if keep is None else keep.to(device))
    _assert_same_rows(state, want)


@pytest.mark.parametrize("lengths", [[0, 3, 16, 40], [257, 600, 1, 512]])  # one chunk / several chunks per head
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_compact_paths(device, lengths, dtype):
    B, H, S, D = 2, 2, 16, 64
    state = _state(B, H, S, D, lengths, dtype, device)
    want = _cpu(state)
    L = max(lengths)
    keep = torch.rand(B, H, L, generator=torch.Generator().manual_seed(L)) < 0.5
    paged_reference.paged_compact_kv_(*_args(want), keep)
    attngate_ext.paged_compact_kv_(*_args(state), keep.to(device))
    _assert_same_rows(state, want)


def test_remove_rows_paths(device):
    B, H, S, D = 2, 2, 4, 66
    state = _state(B, H, S, D, [9, 1, 0, 13], torch.bfloat16, device)
    want = _cpu(state)
    rows = torch.tensor([[[0, 8, 3], [0, -1, -1]], [[-1, -1, -1], [12, 4, -1]]], dtype=torch.int32)
    paged_reference.paged_remove_rows_(*_args(want), rows)
    attngate_ext.paged_remove_rows_(*_args(state), rows.to(device))
    _assert_same_rows(state, want)


@pytest.mark.parametrize("group", [1, 2, 4, 8, 12])  # GQA tiles of 1, 2, 4 and 8 query heads
@pytest.mark.parametrize("D,length,extra", [(64, 40, 0), (128, 3000, 5), (256, 70, 3), (66, 20, 2)])
def test_decode_attention_paths(device, group, D, length, extra):
    B, H, S = 2, 2, 16
    dtype = torch.bfloat16 if D % 8 == 0 else torch.float32
    state = _state(B, H, S, D, [0, length, 1, length // 2], dtype, device)
    g = torch.Generator().manual_seed(group + D)
    query = torch.randn(B, H * group, D, generator=g).to(dtype)
    extra_args = []
    if extra:
        extra_args = [torch.randn(B, H, extra, D, generator=g).to(dtype), torch.randn(B, H, extra, D, generator=g).to(dtype),
                      torch.rand(B, H, extra, generator=g) < 0.6]
    want = paged_reference.paged_decode_attention(query, *(state[n].cpu() for n in NAMES[:4]), 0.3, *extra_args)
    got = attngate_ext.paged_decode_attention(query.to(device), *_args(state)[:4], 0.3,
                                              *(t.to(device) for t in extra_args))
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("T,window,extra", [(1, 1, 0), (17, 3, 4), (70, 1, 0), (45, 8, 6)])
@pytest.mark.parametrize("group", [1, 3])
def test_prefill_attention_paths(device, T, window, extra, group):
    B, H, S, D = 2, 2, 16, 64
    dtype = torch.float16
    state = _state(B, H, S, D, [0, 50, 7, 33], dtype, device)
    g = torch.Generator().manual_seed(T * 10 + window)
    query = torch.randn(B, H * group, T, D, generator=g).to(dtype)
    key, value = torch.randn(B, H, T, D, generator=g).to(dtype), torch.randn(B, H, T, D, generator=g).to(dtype)
    keep = torch.rand(B, H, T, generator=g) < 0.5
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, : T // 3] = False  # left padding in row 1
    extra_args = []
    if extra:
        extra_args = [torch.randn(B, H, extra, D, generator=g).to(dtype), torch.randn(B, H, extra, D, generator=g).to(dtype),
                      torch.randint(-1, T, (B, H, extra), generator=g, dtype=torch.int32)]
    inputs = [key, value, keep, valid]
    want = paged_reference.paged_prefill_attention(query, *(state[n].cpu() for n in NAMES[:4]), *inputs, window, 0.2,
                                                   *extra_args)
    got = attngate_ext.paged_prefill_attention(query.to(device), *_args(state)[:4], *(t.to(device) for t in inputs),
                                               window, 0.2, *(t.to(device) for t in extra_args))
    rows = valid.view(B, 1, T).expand(B, H * group, T)  # padding queries' outputs are not specified
    torch.testing.assert_close(got.cpu().float()[rows], want.float()[rows], rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("with_ring_keep", [False, True])
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 64), (torch.float32, 66)])
def test_decode_step_paths(device, with_ring_keep, dtype, D):
    B, H, S, W, group = 3, 2, 4, 3, 4
    state = _state(B, H, S, D, [0, 4, 7, 8, 1, 12], dtype, device, room=S)
    want = _cpu(state)
    g = torch.Generator().manual_seed(D)
    ring = {"ring_key": torch.randn(B, H, W, D, generator=g).to(dtype),
            "ring_value": torch.randn(B, H, W, D, generator=g).to(dtype),
            "ring_valid": torch.rand(B, H, W, generator=g) < 0.7}
    ring["ring_keep"] = (torch.rand(B, H, W, generator=g) < 0.5) & ring["ring_valid"]
    query = torch.randn(B, H * group, D, generator=g).to(dtype)
    key, value = torch.randn(B, H, D, generator=g).to(dtype), torch.randn(B, H, D, generator=g).to(dtype)
    keep = torch.rand(B, H, generator=g) < 0.5
    valid = torch.tensor([True, False, True])
    keep &= valid.unsqueeze(1)
    ring_dev = {k: v.to(device).clone() for k, v in ring.items()}

    def call(op, st, r, dev):
        return op(query.to(dev), *_args(st), key.to(dev), value.to(dev), keep.to(dev), valid.to(dev), r["ring_key"],
                  r["ring_value"], r["ring_valid"], 2, 0.3, r["ring_keep"] if with_ring_keep else None)

    expected = call(paged_reference.paged_decode_step_, want, ring, "cpu")
    out = call(attngate_ext.paged_decode_step_, state, ring_dev, device)
    _assert_same_rows(state, want)
    torch.testing.assert_close(out.cpu().float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])
    for name in ring:
        assert torch.equal(ring_dev[name].cpu(), ring[name]), name
