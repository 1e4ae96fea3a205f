"""The pool slack rule: after a prompt and after generate(), every page pool (the model's K/V and the gates' K'/V', in
every layer) holds at most ``held + held // 8 + one page per (batch row, head)`` pages, ``held`` being the pages some
(row, head) holds. Checked on heads that keep everything next to heads that keep nothing, on learned-style gates that
keep about half, under a token budget, and on the bare PagedKV through appends, compaction, removal and beams."""

from __future__ import annotations

import pytest
import torch

import attngate_ext as ag
from attngate_ext import AttnGateCache, TokenPolicy
from attngate_ext.cache.paged_kv import PagedKV
from attngate_ext.models.calibration import randomize_gates
from attngate_ext.models.model import gated_layers
from helpers.models import left_pad, make_model, random_ids


def _pool_over_bound(pages: PagedKV) -> int:
    """Pages the pool holds beyond the slack rule (<= 0 when it holds)."""
    held = pages.pages_used()
    rows, heads = pages.lengths.shape
    assert pages.num_pages - held == pages.free_page_count()  # every page is held or free, none lost
    return pages.num_pages - (held + held // 8 + rows * heads)


def _check_every_pool(cache: AttnGateCache) -> None:
    for index, layer in enumerate(cache.layers):
        assert _pool_over_bound(layer.kv) <= 0, f"layer {index}: K/V pool"
        if layer.gate_kv is not None:
            assert _pool_over_bound(layer.gate_kv.pages) <= 0, f"layer {index}: gate K'/V' pool"


class KeepHeads(TokenPolicy):
    """Keeps every valid token on the chosen KV heads and nothing on the others."""

    def __init__(self, heads: torch.Tensor) -> None:
        self.heads = heads

    def keep_flags(self, valid: torch.Tensor, positions, heads: int) -> torch.Tensor:
        return valid.unsqueeze(1) & self.heads.view(1, -1, 1).to(valid.device)


def _prompts():
    return left_pad([random_ids(1, 500, seed=1)[0], random_ids(1, 340, seed=2)[0]])


def _run(model, new_tokens: int, **cache_options) -> AttnGateCache:
    ids, mask = _prompts()
    cache = AttnGateCache(**cache_options)
    kwarg = {ag.cache_kwarg(model): cache}
    if new_tokens == 0:
        model(ids, attention_mask=mask, use_cache=True, **kwarg)
    else:
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0, **kwarg)
    return cache


@pytest.mark.parametrize("new_tokens", [0, 40])
@torch.no_grad()
def test_heads_keeping_everything_next_to_heads_keeping_nothing(new_tokens):
    model = ag.add_attention_gates(make_model("llama", num_hidden_layers=3, num_key_value_heads=4))
    pairs = torch.zeros(3 * 4, dtype=torch.bool)
    pairs[torch.randperm(12, generator=torch.Generator().manual_seed(0))[:3]] = True  # a quarter keep everything
    for attn, heads in zip(gated_layers(model), pairs.view(3, 4)):
        attn.policy = KeepHeads(heads)
    cache = _run(model, new_tokens)
    _check_every_pool(cache)
    lengths = torch.stack([layer.kv.lengths for layer in cache.layers])
    assert (lengths == 0).any() and (lengths > 300).any()  # heads holding nothing next to heads holding everything


@pytest.mark.parametrize("new_tokens", [0, 40])
@torch.no_grad()
def test_gates_keeping_about_half(new_tokens):
    model = ag.add_attention_gates(make_model("llama", num_hidden_layers=2),
                                   ag.AttentionGateConfig(protect_recent=8, sink_tokens=1))
    randomize_gates(model, seed=3)
    cache = _run(model, new_tokens)
    _check_every_pool(cache)
    assert 0.2 < cache.memory_report().eviction_ratio < 0.9
    assert any(layer.gate_kv is not None for layer in cache.layers)  # the gates' pools were checked too


@torch.no_grad()
def test_under_a_token_budget():
    model = ag.add_attention_gates(make_model("llama", num_hidden_layers=2),
                                   ag.AttentionGateConfig(protect_recent=4))
    randomize_gates(model, seed=5)
    cache = _run(model, 40, max_tokens_per_head=48)
    _check_every_pool(cache)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_kv_keeps_the_rule_through_its_ops(seed):
    gen = torch.Generator().manual_seed(seed)
    B, H, D = 3, 2, 8
    pages = PagedKV(B, H, D, torch.float32, torch.device("cpu"), page_size=4)
    for _ in range(6):
        rows = int(torch.randint(1, 40, (1,), generator=gen))
        key = torch.randn(B, H, rows, D, generator=gen)
        keep = torch.rand(B, H, rows, generator=gen) < torch.rand(B, H, 1, generator=gen)  # per-head rates
        pages.append(key, key, keep)
        pages.shrink()  # what the cache does at the end of a prompt
        assert _pool_over_bound(pages) <= 0
        for _ in range(int(torch.randint(1, 30, (1,), generator=gen))):  # decode-sized appends
            pages.append(key[:, :, :1], key[:, :, :1], None)
            assert _pool_over_bound(pages) <= 0
        length = int(pages.lengths.max())
        pages.compact(torch.rand(B, H, length, generator=gen) < 0.3)
        pages.shrink()
        assert _pool_over_bound(pages) <= 0
    pages.index_batch(torch.tensor([2, 2, 0, 1]))  # beams: rows repeat
    assert _pool_over_bound(pages) <= 0
