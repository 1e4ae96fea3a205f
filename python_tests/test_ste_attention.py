"""The blocked straight-through training attention against the plain training formula (values and grads)."""

from __future__ import annotations

import pytest
import torch

from attngate_ext import reference
from attngate_ext.gate.masks import block_visibility, grouped_attention
from attngate_ext.gate.ste_attention import ste_gated_attention


def _inputs(B, Hq, H, T, D, dtype, seed=0, padded=False, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g)
    if layout == "swap12":  # (B, T, H, D) storage viewed as (B, H, T, D): non-contiguous like HF projections
        k = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
        v = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    else:
        k = torch.randn(B, H, T, D, generator=g)
        v = torch.randn(B, H, T, D, generator=g)
    probs = torch.rand(B, H, T, generator=g)
    valid = None
    if padded:
        valid = torch.ones(B, T, dtype=torch.bool)
        for b in range(B):
            valid[b, : int(torch.randint(0, T, (1,), generator=g))] = False  # left padding of random length
    return [t.to(dtype).requires_grad_() for t in (q, k, v, probs)] + [valid]


def _ste(probs):
    hard = (probs >= 0.5).to(probs.dtype)
    return hard + probs - probs.detach()


@pytest.mark.parametrize("B,Hq,H,T,D", [(1, 1, 1, 1, 8), (2, 4, 2, 17, 16), (1, 6, 3, 40, 32), (2, 2, 2, 64, 8)])
@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("block", [1, 7, 128])
def test_matches_reference_values_and_gradients(B, Hq, H, T, D, window, padded, block):
    q, k, v, probs, valid = _inputs(B, Hq, H, T, D, torch.float32, seed=T + window, padded=padded)
    got = ste_gated_attention(q, k, v, _ste(probs), valid, window, block_size=block)
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (q, k, v, probs), grad)
    want = reference.ste_gated_attention(q, k, v, _ste(probs), valid, window)
    want_grads = torch.autograd.grad(want, (q, k, v, probs), grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, a, b in zip("q k v probs".split(), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_non_contiguous(dtype):
    q, k, v, probs, valid = _inputs(2, 4, 2, 33, 16, dtype, padded=True, layout="swap12")
    assert not k.is_contiguous()
    got = ste_gated_attention(q, k, v, _ste(probs), valid, 2, block_size=8)
    assert got.dtype == dtype
    want = reference.ste_gated_attention(q, k, v, _ste(probs), valid, 2)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    dq, dp = torch.autograd.grad(got.float().sum(), (q, probs))
    wq, wp = torch.autograd.grad(want.float().sum(), (q, probs))
    torch.testing.assert_close(dq.float(), wq.float(), rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(dp.float(), wp.float(), rtol=5e-2, atol=5e-2)


def test_an_evicted_key_gets_the_gradient_of_keeping_it():
    q, k, v, probs, _ = _inputs(1, 2, 1, 12, 8, torch.float32, seed=3)
    with torch.no_grad():
        probs.fill_(0.9)
        probs[0, 0, 4] = 0.1  # evicted
    out = ste_gated_attention(q, k, v, _ste(probs), None, 1)
    (dp,) = torch.autograd.grad(out.pow(2).sum(), probs)
    assert dp[0, 0, 4] != 0 and torch.isfinite(dp).all()
    assert dp[0, 0, 11] == 0  # the last key is seen by no later query, so its flag cannot matter


def test_all_kept_equals_causal_attention_and_all_evicted_sees_only_the_window():
    q, k, v, _, _ = _inputs(2, 4, 2, 20, 16, torch.float32)
    ones = torch.ones(2, 2, 20)
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(ste_gated_attention(q, k, v, ones, window=1), causal, rtol=1e-5, atol=1e-5)
    # Nothing kept, w = 1: each query sees only itself, so the output is its own value row.
    alone = ste_gated_attention(q, k, v, torch.zeros_like(ones), window=1)
    torch.testing.assert_close(alone, v.repeat_interleave(2, dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,Hq,H,T,D,window,padded", [(2, 4, 2, 17, 16, 1, True), (1, 6, 3, 40, 32, 3, False)])
def test_soft_capped_scores_match_the_reference_with_gradients(B, Hq, H, T, D, window, padded):
    # Scores of about 4 (scale 1) against a cap of 2: the cap is reached, so tanh's slope matters in backward.
    q, k, v, probs, valid = _inputs(B, Hq, H, T, D, torch.float32, seed=T, padded=padded)
    got = ste_gated_attention(q, k, v, _ste(probs), valid, window, scale=1.0, block_size=7, softcap=2.0)
    want = reference.ste_gated_attention(q, k, v, _ste(probs), valid, window, scale=1.0, softcap=2.0)
    assert (want - reference.ste_gated_attention(q, k, v, _ste(probs), valid, window, scale=1.0)).abs().max() > 0.1
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (q, k, v, probs), grad)
    want_grads = torch.autograd.grad(want, (q, k, v, probs), grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, a, b in zip("q k v probs".split(), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")
    # The masked attention of the dropout path (hard flags, no dropout) soft-caps the same way.
    keep = probs.detach() >= 0.5
    visible = block_visibility(keep, valid, window)
    masked = grouped_attention(q.detach(), k.detach(), v.detach(), visible, 1.0, 0.0, softcap=2.0)
    hard = reference.ste_gated_attention(q.detach(), k.detach(), v.detach(), keep.float(), valid, window, scale=1.0,
                                         softcap=2.0)
    rows = valid if valid is not None else torch.ones(B, T, dtype=torch.bool)  # padded queries' rows are unused
    torch.testing.assert_close(masked.transpose(1, 2)[rows], hard.transpose(1, 2)[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "bad,match",
    [({"key": torch.zeros(2, 3, 8, 4)}, "H dividing Hq"), ({"value": torch.zeros(2, 2, 8, 5)}, "value must"),
     ({"retain": torch.zeros(2, 2, 7)}, "retain must"), ({"valid": torch.ones(2, 9, dtype=torch.bool)}, "valid must"),
     ({"window": 0}, "window"), ({"softcap": -1.0}, "softcap")],
)
def test_bad_input(bad, match):
    args = dict(query=torch.zeros(2, 4, 8, 4), key=torch.zeros(2, 2, 8, 4), value=torch.zeros(2, 2, 8, 4),
                retain=torch.zeros(2, 2, 8), valid=None, window=1)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ste_gated_attention(**args)
