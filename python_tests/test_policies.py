"""Baseline policies: flags match each definition on hand-checkable inputs; pruning and in-context memory."""

from __future__ import annotations

import math

import pytest
import torch

import attngate_ext as ag
from attngate_ext.cache.paged_kv import PagedKV
from attngate_ext.evaluation.in_context import ChunkPruner, use_in_context_policy
from attngate_ext.evaluation.policies import H2O, LocalWindow, RandomPolicy, SnapKV, StreamingLLM, budget_flags, keep_budget
from attngate_ext.evaluation.post_prefill import prune_cache
from attngate_ext.models.layer_inputs import recording_layer_inputs
from attngate_ext import cache_kwarg

from helpers.models import make_model, random_ids


def _flags(policy, valid, ratio, q=None, k=None):
    B, T = valid.shape
    q = torch.randn(B, 4, T, 8) if q is None else q
    k = torch.randn(B, 2, T, 8) if k is None else k
    budget = keep_budget(valid, ratio)
    return budget_flags(policy.scores(q, k, valid, budget), valid, budget)


def _slots(flags_row):
    return flags_row.nonzero().flatten().tolist()


def test_streaming_llm_keeps_exactly_the_sinks_and_the_window():
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :2] = False  # left padding: row 1's positions start at slot 2
    keep = _flags(StreamingLLM(sinks=4), valid, ratio=0.5)
    assert _slots(keep[0, 0]) == [0, 1, 2, 3, 10, 11]  # 6 of 12: 4 sinks + the last 2
    assert _slots(keep[1, 1]) == [2, 3, 4, 5, 11]  # 5 of 10 valid: ceil(0.5 * 10) = 5
    assert torch.equal(keep[:, 0], keep[:, 1])  # position-based: every head alike


def test_local_window_and_random():
    valid = torch.ones(1, 10, dtype=torch.bool)
    assert _slots(_flags(LocalWindow(), valid, ratio=0.7)[0, 0]) == [7, 8, 9]
    random = _flags(RandomPolicy(seed=3), valid, ratio=0.6)
    assert random.sum(dim=-1).tolist() == [[4, 4]]  # exactly the budget per head
    assert torch.equal(random, _flags(RandomPolicy(seed=3), valid, ratio=0.6))
    assert not torch.equal(random[0, 0], random[0, 1]) or not torch.equal(random, _flags(RandomPolicy(4), valid, 0.6))


def _naive_attention(q, k, i):
    """Softmax of query row i over keys 0..i, summed over a KV head's query heads: {(b, h): [weights]}."""
    B, Hq, T, D = q.shape
    H = k.shape[1]
    out = torch.zeros(B, H, T)
    for b in range(B):
        for qh in range(Hq):
            h = qh // (Hq // H)
            s = torch.tensor([float(q[b, qh, i] @ k[b, h, j]) / math.sqrt(D) for j in range(i + 1)])
            out[b, h, : i + 1] += torch.softmax(s, dim=0)
    return out


def test_h2o_keeps_heavy_hitters_and_the_recent_half():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8)
    u = torch.randn(8)
    q[0, :, 6:] = u + 0.1 * torch.randn(4, 10, 8)  # the later queries all look for u ...
    k[0, :, 5] = 3 * u  # ... which token 5 holds
    valid = torch.ones(1, 16, dtype=torch.bool)
    keep = _flags(H2O(), valid, ratio=0.75, q=q, k=k)  # budget 4: 2 recent + 2 heavy
    accumulated = sum(_naive_attention(q, k, i) for i in range(16))
    for h in range(2):
        heavy = accumulated[0, h, :14].topk(2).indices.sort().values.tolist()
        assert _slots(keep[0, h]) == sorted(heavy + [14, 15])
        assert 5 in heavy


def test_snapkv_votes_of_the_observation_window_with_pooling():
    torch.manual_seed(1)
    T, window, kernel = 20, 4, 3
    q, k = torch.randn(1, 2, T, 8), torch.randn(1, 2, T, 8)
    valid = torch.ones(1, T, dtype=torch.bool)
    keep = _flags(SnapKV(window=window, kernel=kernel), valid, ratio=0.6, q=q, k=k)  # budget 8: window 4 + 4
    votes = sum(_naive_attention(q, k, i) for i in range(T - window, T))[0]
    padded = torch.nn.functional.pad(votes, (1, 1))  # avg pooling, kernel 3, zero padding (count_include_pad)
    pooled = (padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]) / 3
    for h in range(2):
        chosen = pooled[h, : T - window].topk(4).indices.sort().values.tolist()
        assert _slots(keep[0, h]) == chosen + list(range(T - window, T))


def test_budget_flags_ties_keep_the_earlier_and_skip_padding():
    scores = torch.zeros(1, 1, 6)
    valid = torch.tensor([[False, True, True, True, True, True]])
    assert _slots(budget_flags(scores, valid, torch.tensor([2]))[0, 0]) == [1, 2]
    with pytest.raises(ValueError, match="eviction_ratio"):
        keep_budget(valid, 1.5)


@pytest.mark.parametrize("policy", [StreamingLLM(), H2O(), SnapKV(window=8), RandomPolicy(), LocalWindow()])
@torch.no_grad()
def test_post_prefill_pruning_frees_the_promised_memory(policy):
    model = ag.add_attention_gates(make_model("mistral"), ag.AttentionGateConfig(decode_gating=False))
    ids = random_ids(2, 64, seed=2)
    cache = ag.AttnGateCache()
    with recording_layer_inputs(model) as inputs:
        model(ids, use_cache=True, **{cache_kwarg(model): cache})
    flags = prune_cache(model, cache, policy, eviction_ratio=0.75, inputs=inputs)
    report = cache.memory_report()
    for layer, keep in zip(cache.layers, flags):
        assert layer.kv.lengths.tolist() == [[16, 16], [16, 16]] and keep.sum() == 2 * 2 * 16
        assert layer.kv.pages_used() == 2 * 2  # one 16-row page per (row, head): the pruned pages went back
        assert layer.kv.num_pages <= 2 * 2 * 2  # ... and the pool shrank to them plus one page of headroom each
    assert report.eviction_ratio == 0.75 and report.gate_bytes == 0
    ring = sum(layer.window.nbytes for layer in cache.layers)  # w = 1: the newest token of every head
    assert report.kv_bytes == 0.25 * report.dense_bytes + ring
    step = model(random_ids(2, 1, seed=9), use_cache=True, **{cache_kwarg(model): cache})  # decoding goes on
    assert torch.isfinite(step.logits).all() and cache.layers[0].kv.lengths.tolist() == [[17, 17], [17, 17]]


@pytest.mark.parametrize("policy", [StreamingLLM(sinks=4), LocalWindow(), RandomPolicy(seed=1)])
@torch.no_grad()
def test_in_context_policies_hold_their_budget_and_match_the_full_forward(policy):
    model = ag.add_attention_gates(make_model("llama"))
    ids = random_ids(2, 48, seed=4)
    use_in_context_policy(model, policy, eviction_ratio=0.5, context_length=48)
    full = model(ids, use_cache=False).logits
    use_in_context_policy(model, policy, eviction_ratio=0.5, context_length=48)  # same random draws again
    cache = ag.AttnGateCache()
    chunked = model(ids, use_cache=True, **{cache_kwarg(model): cache}).logits
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    # Rows attended to: the paged (kept) rows plus the evicted tokens still inside the window.
    lengths = torch.stack([layer.kv.lengths + layer.window.visible_rows(layer.seen) for layer in cache.layers]).float()
    if isinstance(policy, RandomPolicy):
        assert abs(lengths.mean().item() - 24) < 5
    else:
        assert (lengths == 24).all()  # sinks + w - 1 = 24 rows of 48 in every head
        sinks = policy.sinks if isinstance(policy, StreamingLLM) else 0
        assert all((layer.kv.lengths == sinks).all() for layer in cache.layers)  # only the sinks are in the pages
        assert cache.memory_report().gate_bytes == 0
    use_in_context_policy(model, None)
    assert model.model.layers[0].self_attn.policy is None


@pytest.mark.parametrize("policy", [H2O(), SnapKV(window=8, kernel=3)])
@torch.no_grad()
def test_in_context_h2o_and_snapkv_hold_the_ratio_after_every_chunk(policy):
    model = ag.add_attention_gates(make_model("qwen2"))
    ids = random_ids(2, 50, seed=6)
    use_in_context_policy(model, policy, eviction_ratio=0.5)
    cache = ag.AttnGateCache()
    seen = []
    pruner = model.model.layers[0].self_attn.policy  # one ChunkPruner serves every layer
    assert all(layer.self_attn.policy is pruner for layer in model.model.layers)
    inner = pruner.after_chunk

    def spy(pages, q, k, valid, tokens_seen):
        inner(pages, q, k, valid, tokens_seen)
        seen.append((int(tokens_seen[0]), pages.lengths.clone()))

    pruner.after_chunk = spy
    out = model(ids, use_cache=True, **{cache_kwarg(model): cache})
    assert torch.isfinite(out.logits).all()
    assert len(seen) == 2 * math.ceil(50 / (8 if isinstance(policy, SnapKV) else 32))  # layers x chunks
    for tokens, lengths in seen:
        assert (lengths == math.ceil(tokens * 0.5)).all()  # pruned to the budget after each chunk
    assert cache.memory_report().eviction_ratio == 0.5
    with pytest.raises(ValueError, match="needs a cache"):
        model(ids, use_cache=False)
    # Decoding goes on with the pruned cache (one token per chunk: pruned again every step).
    model(random_ids(2, 1, seed=8), use_cache=True, **{cache_kwarg(model): cache})
    assert cache.layers[0].kv.lengths.max() <= 26


def test_chunk_pruner_h2o_matches_a_naive_simulation():
    torch.manual_seed(2)
    B, Hq, H, D, T, chunk, ratio = 1, 2, 1, 8, 40, 8, 0.5
    q, k = torch.randn(B, Hq, T, D) * 2, torch.randn(B, H, T, D) * 2
    pages = PagedKV(B, H, D, torch.float32, torch.device("cpu"), page_size=4)
    tokens_seen = torch.zeros(B, dtype=torch.long)
    pruner = ChunkPruner(H2O(), ratio)
    # Naive: explicit list of cached token ids and their accumulated attention.
    cached, acc = [], {}
    for start in range(0, T, chunk):
        sl = slice(start, start + chunk)
        pages.append(k[:, :, sl], k[:, :, sl], None)
        tokens_seen += chunk
        pruner.after_chunk(pages, q[:, :, sl], k[:, :, sl], torch.ones(B, chunk, dtype=torch.bool), tokens_seen)
        cached += list(range(start, start + chunk))
        for i in range(start, start + chunk):
            visible = [j for j in cached if j <= i]
            for qh in range(Hq):
                s = torch.stack([q[0, qh, i] @ k[0, 0, j] for j in visible]) / math.sqrt(D)
                for j, p in zip(visible, torch.softmax(s, 0).tolist()):
                    acc[j] = acc.get(j, 0.0) + p
        budget = math.ceil((start + chunk) * (1 - ratio))
        recent = sorted(cached)[-math.ceil(budget * 0.5):]
        rest = sorted((j for j in cached if j not in recent), key=lambda j: (-acc[j], cached.index(j)))
        cached = sorted(recent + rest[: budget - len(recent)])
        n = int(pages.lengths[0, 0])
        rows = pages.gather()[0]
        got = [int(torch.nonzero((k[0, 0] == rows[0, 0, r]).all(-1))[0]) for r in range(n)]
        assert got == cached, start


def test_chunk_pruner_snapkv_keeps_older_tokens_when_the_budget_is_small():
    torch.manual_seed(3)
    q, k = torch.randn(1, 2, 32, 8), torch.randn(1, 1, 32, 8)
    pages = PagedKV(1, 1, 8, torch.float32, torch.device("cpu"), page_size=16)
    tokens_seen = torch.zeros(1, dtype=torch.long)
    pruner = ChunkPruner(SnapKV(window=16, kernel=3), 0.5)
    for start in (0, 16):
        pages.append(k[:, :, start : start + 16], k[:, :, start : start + 16], None)
        tokens_seen += 16
        pruner.after_chunk(pages, q[:, :, start : start + 16], k[:, :, start : start + 16],
                           torch.ones(1, 16, dtype=torch.bool), tokens_seen)
    cached = pages.gather()[0]
    rows = [int(torch.nonzero((k[0, 0] == cached[0, 0, r]).all(-1))[0]) for r in range(16)]
    assert len(rows) == 16 and sum(t >= 24 for t in rows) == 8  # newest half of the budget protected ...
    assert any(t < 16 for t in rows)  # ... and the rest chosen by votes, older chunks included
