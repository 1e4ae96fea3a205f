"""Soft-capped attention (Gemma 2: a score s becomes softcap * tanh(s / softcap) before the softmax) in every
attention op, on every device and dtype, against the pure-PyTorch references; 0 leaves the scores as they are, and a
negative or non-finite softcap is refused naming it."""

from __future__ import annotations

import pytest
import torch

import attngate_ext
from attngate_ext.ops import paged_reference, reference

from helpers.devices import sync_if_cuda
from helpers.paged_pipeline import pipeline_inputs
from helpers.tensors import DTYPES

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
CAPS = [0.0, 0.7, 30.0]  # off, tight (most scores saturate), loose
SCALE = 1.3  # large scores, so that the cap matters


def _inputs(device, dtype, seed=0):
    t = pipeline_inputs("cpu", seed, chunk=9)
    for name in ("key_pages", "value_pages", "chunk_query", "key", "value", "query", "new_key", "new_value",
                 "ring_key", "ring_value"):
        t[name] = (t[name] * 2).to(dtype)
    return {k: v.to(device) for k, v in t.items()}, t


def _close(got, want, dtype):
    sync_if_cuda(got.device.type)
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("softcap", CAPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_attention(device, dtype, softcap):
    t, ref = _inputs(device, dtype)
    args = ("query", "key_pages", "value_pages", "page_table", "lengths")
    got = attngate_ext.paged_decode_attention(*(t[a] for a in args), SCALE, t["ring_key"], t["ring_value"],
                                              t["ring_valid"], softcap=softcap)
    want = paged_reference.paged_decode_attention(*(ref[a] for a in args), SCALE, ref["ring_key"], ref["ring_value"],
                                                  ref["ring_valid"], softcap=softcap)
    _close(got, want, dtype)
    if softcap == 0.7:  # the cap really changes the result
        uncapped = paged_reference.paged_decode_attention(*(ref[a] for a in args), SCALE, ref["ring_key"],
                                                          ref["ring_value"], ref["ring_valid"])
        assert (uncapped.float() - want.float()).abs().max() > 10 * TOL[dtype]


@pytest.mark.parametrize("softcap", CAPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_prefill_attention(device, dtype, softcap):
    t, ref = _inputs(device, dtype)
    args = ("chunk_query", "key_pages", "value_pages", "page_table", "lengths", "key", "value", "keep")
    got = attngate_ext.paged_prefill_attention(*(t[a] for a in args), None, 3, SCALE, softcap=softcap)
    want = paged_reference.paged_prefill_attention(*(ref[a] for a in args), None, 3, SCALE, softcap=softcap)
    _close(got, want, dtype)


@pytest.mark.parametrize("softcap", CAPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode_step(device, dtype, softcap):
    t, ref = _inputs(device, dtype)
    names = ("query", "key_pages", "value_pages", "page_table", "lengths", "free_pages", "free_count", "new_key",
             "new_value", "new_keep")
    ring = ("ring_key", "ring_value", "ring_valid")
    got = attngate_ext.paged_decode_step_(*(t[a] for a in names), None, *(t[a] for a in ring), 1, SCALE,
                                          t["ring_keep"], softcap=softcap)
    want = paged_reference.paged_decode_step_(*(ref[a] for a in names), None, *(ref[a] for a in ring), 1, SCALE,
                                              ref["ring_keep"], softcap=softcap)
    _close(got, want, dtype)


@pytest.mark.parametrize("softcap", CAPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rectangle_decode_attention(device, dtype, softcap):
    g = torch.Generator().manual_seed(1)
    kc, vc = (torch.randn(3, 2, 40, 16, generator=g) * 2).to(dtype), torch.randn(3, 2, 40, 16, generator=g).to(dtype)
    query = (torch.randn(3, 6, 16, generator=g) * 2).to(dtype)
    lengths = torch.tensor([[40, 0], [1, 17], [33, 2]], dtype=torch.int32)
    got = attngate_ext.decode_attention(query.to(device), kc.to(device), vc.to(device), lengths.to(device), SCALE,
                                        softcap=softcap)
    _close(got, reference.decode_attention(query, kc, vc, lengths, SCALE, softcap=softcap), dtype)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_softcap_is_refused_naming_it(device, bad):
    t, _ = _inputs(device, torch.float32)
    with pytest.raises(RuntimeError, match="softcap must be finite and >= 0"):
        attngate_ext.paged_decode_attention(t["query"], t["key_pages"], t["value_pages"], t["page_table"],
                                            t["lengths"], SCALE, softcap=bad)
    with pytest.raises(RuntimeError, match="softcap must be finite and >= 0"):
        attngate_ext.paged_prefill_attention(t["chunk_query"], t["key_pages"], t["value_pages"], t["page_table"],
                                             t["lengths"], t["key"], t["value"], t["keep"], None, 1, SCALE,
                                             softcap=bad)


def test_opcheck_with_softcap():
    t, _ = _inputs("cpu", torch.float32)
    torch.library.opcheck(torch.ops.attngate.paged_decode_attention,
                          (t["query"], t["key_pages"], t["value_pages"], t["page_table"], t["lengths"], SCALE),
                          {"softcap": 2.0})
    torch.library.opcheck(torch.ops.attngate.paged_prefill_attention,
                          (t["chunk_query"], t["key_pages"], t["value_pages"], t["page_table"], t["lengths"], t["key"],
                           t["value"], t["keep"], None, 2, SCALE), {"softcap": 2.0})
