"""The hard token budget, ``AttnGateCache(max_tokens_per_head=N)``: the row eviction keys follow every op that moves
rows, the bound holds after every chunk and step (prefill chunks, decode, padding, beams, a pruning policy), the rows
that stay are the best-scoring ones, and a budget that never binds changes nothing."""

from __future__ import annotations

import random

import pytest
import torch

import attngate_ext as ag
from attngate_ext import AttentionGateConfig, AttnGateCache
from attngate_ext.cache.paged_kv import PagedKV
from attngate_ext.cache.row_keys import POSITION_BITS, score_keys
from attngate_ext.evaluation.in_context import use_in_context_policy
from attngate_ext.evaluation.policies import H2O
from attngate_ext.models.calibration import randomize_gates
from attngate_ext.models.model import gated_layers

from helpers.devices import DEVICES
from helpers.models import left_pad, make_model, random_ids

POSITION_MASK = (1 << POSITION_BITS) - 1


# ---- the keys -----------------------------------------------------------------------------------------------------

def test_score_keys_order_by_score_then_position():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 40, generator=generator)
    scores[..., ::5] = scores[..., 1:2]  # ties
    scores[0, 0, 3] = float("inf")
    scores[1, 2, 7] = -0.0
    scores[1, 2, 8] = 0.0
    keys = score_keys(scores, first_position=100)
    for b in range(2):
        for h in range(3):
            expected = sorted(range(40), key=lambda t: (scores[b, h, t].item(), t))
            assert torch.argsort(keys[b, h]).tolist() == expected
    assert torch.equal(keys & POSITION_MASK, torch.arange(100, 140).expand(2, 3, 40))


def test_score_keys_refuse_positions_beyond_the_key():
    with pytest.raises(ValueError, match="position"):
        score_keys(torch.zeros(1, 1, 2), first_position=(1 << POSITION_BITS) - 1)


# ---- the keys follow the rows through the paged ops -------------------------------------------------------------

def _tagged(B: int, H: int, T: int, first: int, dtype, device) -> torch.Tensor:
    """Keys (B, H, T, D) whose first element is the token's position (exact in every dtype below 256)."""
    key = torch.randn(B, H, T, 8, dtype=torch.float32, device=device)
    key[..., 0] = torch.arange(first, first + T, dtype=torch.float32, device=device)
    return key.to(dtype)


def _check_rows_match_keys(pages: PagedKV) -> None:
    """Every live row's position (stored in its K) equals its eviction key's position."""
    gathered, live, _ = pages.gather()
    for b in range(live.shape[0]):
        for h in range(live.shape[1]):
            n = int(pages.lengths[b, h])
            stored = gathered[b, h, :n, 0].float().round().long().cpu()
            keyed = (pages.row_keys.keys[b, h, :n] & POSITION_MASK).cpu()
            assert torch.equal(stored, keyed), (b, h)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_keys_follow_append_remove_compact_and_beams(device, dtype, page_size):
    rng = random.Random(page_size)
    B, H = 3, 2
    pages = PagedKV(B, H, 8, dtype, torch.device(device), page_size=page_size)
    pages.track_rows(limit=10_000)
    position = 0
    for step in range(12):
        T = rng.choice([1, 3, 9])
        key = _tagged(B, H, T, position, dtype, device)
        keep = torch.rand(B, H, T, device=device) < 0.7
        scores = torch.rand(B, H, T, device=device)
        pages.append(key, key.clone(), keep, score_keys(scores, position))
        position += T
        _check_rows_match_keys(pages)
        if step % 3 == 1:  # remove a few random live rows of each head
            rows = torch.full((B, H, 3), -1, dtype=torch.int32)
            for b in range(B):
                for h in range(H):
                    n = int(pages.lengths[b, h])
                    chosen = rng.sample(range(n), min(n, rng.randint(0, 3)))
                    rows[b, h, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
            pages.remove(rows.to(device))
        elif step % 3 == 2:  # compact with random flags
            L = int(pages.lengths.max())
            pages.compact(torch.rand(B, H, L, device=device) < 0.8)
        _check_rows_match_keys(pages)
    pages.index_batch(torch.tensor([2, 0, 0], device=device))
    _check_rows_match_keys(pages)


@pytest.mark.parametrize("device", DEVICES)
def test_enforce_limit_removes_the_lowest_keys(device):
    generator = torch.Generator().manual_seed(3)
    B, H, T, limit = 2, 3, 30, 7
    pages = PagedKV(B, H, 8, torch.float32, torch.device(device), page_size=4)
    pages.track_rows(limit)
    key = _tagged(B, H, T, 0, torch.float32, device)
    keep = (torch.rand(B, H, T, generator=generator) < 0.6).to(device)
    keep[0, 0] = False  # a head with nothing
    keep[1, 1, :5] = True
    keep[1, 1, 5:] = False  # a head under the limit
    scores = torch.rand(B, H, T, generator=generator).to(device)
    pages.append(key, key.clone(), keep, score_keys(scores, 0))
    pages.enforce_limit(T)
    assert int(pages.lengths.max()) <= limit
    _check_rows_match_keys(pages)
    for b in range(B):
        for h in range(H):
            kept = [t for t in range(T) if keep[b, h, t]]
            best = sorted(kept, key=lambda t: (scores[b, h, t].item(), t))[-limit:]
            held = (pages.row_keys.keys[b, h, :int(pages.lengths[b, h])] & POSITION_MASK).tolist()
            assert sorted(held) == sorted(best), (b, h)


# ---- the cache and the model ---------------------------------------------------------------------------------

def _gated(window: int = 1, sinks: int = 0, chunk: int = 0, seed: int = 0):
    model = make_model("llama", seed=seed)
    ag.add_attention_gates(model, AttentionGateConfig(protect_recent=window, sink_tokens=sinks, prefill_chunk=chunk))
    randomize_gates(model, seed=seed)  # content-dependent flags, about half evicted
    return model


def _held_per_head(cache: AttnGateCache) -> list[int]:
    """The most model K/V rows a (row, head) of any layer holds: paged rows plus the window ring's slots."""
    return [int(layer.kv.lengths.max()) + layer.window.capacity for layer in cache.layers]


def _watch_bound(model, cache: AttnGateCache, budget: int) -> list[int]:
    """Checks the bound after every forward of the decoder; returns the largest head seen per forward."""
    seen: list[int] = []

    def check(module, args, output):
        held = _held_per_head(cache)
        assert max(held) <= budget, held
        seen.append(max(held))

    model.model.register_forward_hook(check)
    return seen


@pytest.mark.parametrize("window,sinks,chunk", [(1, 0, 0), (1, 2, 6), (4, 0, 0), (4, 1, 5)])
def test_the_bound_holds_after_every_chunk_and_step(window, sinks, chunk):
    model = _gated(window, sinks, chunk)
    budget = 9
    ids, mask = left_pad([random_ids(1, 37, seed=1)[0], random_ids(1, 23, seed=2)[0]])
    cache = AttnGateCache(page_size=4, max_tokens_per_head=budget)
    seen = _watch_bound(model, cache, budget)
    model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                   **{ag.cache_kwarg(model): cache})
    assert len(seen) == 12 and max(seen) == budget  # the budget binds, and is never exceeded
    report = cache.memory_report()
    rows = report.kv_bytes  # pages held fit the budget: at most ceil((N - w) / S) pages per (layer, row, head)
    layer = cache.layers[0]
    heads = 2 * layer.kv.lengths.shape[1]
    page_limit = -(-(budget - window) // 4)
    assert report.pages_held <= len(cache.layers) * heads * page_limit
    assert rows > 0


@pytest.mark.parametrize("window,sinks", [(1, 0), (1, 3), (3, 0)])
@pytest.mark.parametrize("chunk", [0, 4])
def test_the_rows_that_stay_are_the_best_scoring(window, sinks, chunk):
    """Layer 0's keys and gate scores do not depend on what was evicted, so its held rows must be the best
    ``N - w`` (by score, then position) of the rows an unbounded cache holds in its pages."""
    model = _gated(window, sinks, chunk)
    ids, mask = left_pad([random_ids(1, 30, seed=4)[0], random_ids(1, 21, seed=5)[0]])
    steps = random_ids(2, 5, seed=6)
    budget = 8
    runs = {}
    # The unbounded run tracks its rows too (a budget it never reaches), to name the position of each row.
    for name, cache in (("free", AttnGateCache(4, 10 ** 6)), ("bounded", AttnGateCache(4, budget))):
        kwargs = {ag.cache_kwarg(model): cache}
        with torch.no_grad():
            model(ids, attention_mask=mask, use_cache=True, **kwargs)
            probs, keeps = [gated_layers(model)[0].last_gate.probs], [gated_layers(model)[0].last_gate.keep]
            full_mask = mask
            for t in range(steps.shape[1]):  # the same tokens for both runs: layer 0 sees the same inputs
                full_mask = torch.cat([full_mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
                model(steps[:, t:t + 1], attention_mask=full_mask, use_cache=True, **kwargs)
                probs.append(gated_layers(model)[0].last_gate.probs)
                keeps.append(gated_layers(model)[0].last_gate.keep)
        runs[name] = (cache.layers[0], torch.cat(probs, dim=2), torch.cat(keeps, dim=2))
    free, probs, keep = runs["free"]
    bounded = runs["bounded"][0]
    total = probs.shape[2]
    threshold = model._attngate_state.config.threshold
    forced = keep & (probs < threshold)
    scores = torch.where(forced, float("inf"), probs)
    free_rows, _, _ = free.kv.gather()
    held_rows, _, _ = bounded.kv.gather()
    for b in range(2):
        for h in range(free.kv.lengths.shape[1]):
            # The unbounded pages hold the kept tokens that left the window.
            in_pages = [t for t in range(total) if keep[b, h, t] and (window == 1 or t < total - window)]
            positions = (free.kv.row_keys.keys[b, h, :int(free.kv.lengths[b, h])] & POSITION_MASK).tolist()
            assert sorted(positions) == in_pages
            best = sorted(in_pages, key=lambda t: (scores[b, h, t].item(), t))[-(budget - window):]
            n = int(bounded.kv.lengths[b, h])
            held = (bounded.kv.row_keys.keys[b, h, :n] & POSITION_MASK).tolist()
            assert sorted(held) == sorted(best), (b, h)
            rows_of = {t: free_rows[b, h, i] for i, t in enumerate(positions)}
            for i, t in enumerate(held):
                torch.testing.assert_close(held_rows[b, h, i], rows_of[t], rtol=0, atol=0)


def test_a_budget_that_never_binds_changes_nothing():
    model = _gated(window=3, sinks=1, chunk=7)
    ids, mask = left_pad([random_ids(1, 25, seed=7)[0], random_ids(1, 18, seed=8)[0]])
    outputs = []
    for cache in (AttnGateCache(), AttnGateCache(max_tokens_per_head=1000)):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True, **{ag.cache_kwarg(model): cache})
        outputs.append((out.sequences, torch.stack(out.scores)))
    assert torch.equal(outputs[0][0], outputs[1][0])
    torch.testing.assert_close(outputs[0][1], outputs[1][1], rtol=0, atol=0)


def test_beam_search_under_a_budget():
    model = _gated(window=2)
    ids = random_ids(2, 20, seed=9)
    budget = 6
    cache = AttnGateCache(page_size=2, max_tokens_per_head=budget)
    seen = _watch_bound(model, cache, budget)
    out = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0,
                         **{ag.cache_kwarg(model): cache})
    assert out.shape == (2, 26) and max(seen) == budget


def test_set_cache_options_reaches_generate_and_h2o_meets_the_budget_with_its_scores():
    model = _gated()
    ag.set_cache_options(model, max_tokens_per_head=10)
    caches = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: caches.append(kwargs.get(ag.cache_kwarg(model))), with_kwargs=True)
    use_in_context_policy(model, H2O(), eviction_ratio=0.2)
    ids = random_ids(2, 40, seed=10)
    model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    cache = caches[-1]
    assert isinstance(cache, AttnGateCache) and cache.max_tokens_per_head == 10
    assert max(_held_per_head(cache)) == 10
    assert ag.set_cache_options(model) == {}


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_budgets_are_refused_naming_the_argument(bad):
    with pytest.raises(ValueError, match="max_tokens_per_head"):
        AttnGateCache(max_tokens_per_head=bad)
    with pytest.raises(ValueError, match="max_tokens_per_head"):
        ag.set_cache_options(_gated(), max_tokens_per_head=bad)


def test_a_budget_below_the_window_is_refused():
    model = _gated(window=8)
    with pytest.raises(ValueError, match=r"max_tokens_per_head \(5\).*protect_recent window \(8\)"):
        model(random_ids(1, 10), use_cache=True, **{ag.cache_kwarg(model): AttnGateCache(max_tokens_per_head=5)})
    with pytest.raises(TypeError):
        ag.set_cache_options(model, page_sise=4)
