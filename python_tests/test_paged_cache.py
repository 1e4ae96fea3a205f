"""The paged AttnGateCache: pages come back, short prompts stay within the stated overhead, half precision holds."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import attngate_ext as ag
from attngate_ext.models.calibration import calibrate_gate_bias, randomize_gates
from attngate_ext import cache_kwarg

from helpers.models import make_model, random_ids


def _prefill_and_decode(model, cache, ids, steps=4, mask=None):
    key = cache_kwarg(model)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{key: cache})
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        token = model(input_ids=token, attention_mask=mask, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)


def _pools(cache):
    return [weakref.ref(t) for layer in cache.layers for store in (layer.kv, layer.gate_kv.pages)
            for t in (store.key_pages, store.value_pages)]


@torch.no_grad()
def test_reset_and_del_give_every_page_back():
    model = ag.add_attention_gates(make_model("qwen2"), ag.AttentionGateConfig(protect_recent=3, sink_tokens=1))
    randomize_gates(model, seed=2)
    cache = ag.AttnGateCache()
    _prefill_and_decode(model, cache, random_ids(2, 40))
    report = cache.memory_report()
    assert report.pages_held > 0 and report.allocated_bytes > 0
    pools = _pools(cache)
    assert all(ref() is not None for ref in pools)
    cache.reset()
    gc.collect()
    assert all(ref() is None for ref in pools)  # nothing else holds the pools: the allocator has them back
    assert cache.memory_report().allocated_bytes == 0
    _prefill_and_decode(model, cache, random_ids(2, 40))  # a reset cache works again
    pools = _pools(cache)
    del cache
    gc.collect()
    assert all(ref() is None for ref in pools)


@pytest.mark.parametrize("page_size", [1, 16])
@torch.no_grad()
def test_short_prompts_stay_within_the_stated_overhead(page_size):
    # Fresh gates keep everything. Held K/V = the valid tokens' rows, plus, per (layer, row, KV head), at most one
    # partly filled page (page_size - 1 rows) and the window ring's flags; a kept token is stored once (in the ring
    # while it is among the last protect_recent tokens, in the pages after). The gates' K'/V' likewise.
    window = 2
    model = ag.add_attention_gates(make_model("mistral"), ag.AttentionGateConfig(head_dim=8, protect_recent=window))
    lengths = [5, 11, 19]
    ids = random_ids(3, max(lengths), seed=3)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, -n:] = 1
    cache = ag.AttnGateCache(page_size=page_size)
    model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache})
    report = cache.memory_report()
    layers, rows, heads, head_dim, elem = 2, 3, 2, 16, 4
    row_bytes = 2 * head_dim * elem  # one K row and one V row
    per_head = (page_size - 1) * row_bytes
    assert report.eviction_ratio == 0.0
    assert report.dense_valid_bytes == layers * heads * sum(lengths) * row_bytes
    assert report.kv_bytes <= report.dense_valid_bytes + layers * rows * heads * (per_head + 2 * window)
    gate_rows = layers * sum(lengths) * 2 * 8 * elem
    assert report.gate_bytes <= gate_rows + layers * rows * (page_size * 2 * 8 * elem + 2 * 8 * elem + 1)
    if page_size == 1:  # no page rounding: exactly the kept rows (the last `window` of them in the ring) + 2 flags
        assert report.kv_bytes == report.dense_valid_bytes + layers * rows * heads * 2 * window


@torch.no_grad()
def test_fresh_gates_in_bfloat16_are_as_close_to_float32_as_the_plain_model():
    # Teacher-forced decode: logits of the plain bf16 model and of the gated bf16 model (fresh gates: keep all)
    # against the plain float32 model on the same tokens. The gated path must not be further from float32.
    base = make_model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
    ids = random_ids(2, 48, seed=5)
    prompt, steps = 32, 16

    def decode_logits(model, gated):
        cache = ag.AttnGateCache() if gated else None
        key = cache_kwarg(model)
        kwargs = {key: cache} if gated else {}
        out = model(input_ids=ids[:, :prompt], use_cache=True, **kwargs)
        cache = cache if gated else out.past_key_values
        logits = [out.logits[:, -1].float()]
        for t in range(prompt, prompt + steps - 1):
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{key: cache})
            logits.append(out.logits[:, -1].float())
        return torch.stack(logits, dim=1)

    reference = decode_logits(base, gated=False)
    plain = decode_logits(base.to(torch.bfloat16), gated=False)
    gated_model = ag.add_attention_gates(base)  # already bf16: the gates are created in bf16
    gated = decode_logits(gated_model, gated=True)
    plain_err = (plain - reference).abs()
    gated_err = (gated - reference).abs()
    assert gated_err.mean() <= plain_err.mean() * 1.05
    assert gated_err.max() <= plain_err.max() * 1.25


@torch.no_grad()
def test_pages_held_follow_each_head_not_the_longest():
    # One head keeps (almost) everything, the others almost nothing: the pages follow each head's own rows.
    model = ag.add_attention_gates(make_model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
                                              intermediate_size=128), ag.AttentionGateConfig(head_dim=8))
    randomize_gates(model, seed=1)
    ids = random_ids(2, 256, seed=4)
    calibrate_gate_bias(model, ids, 0.5)
    for attn in (layer.self_attn for layer in model.model.layers):  # head 0 keeps all, head 1..3 keep little
        attn.gate.score.bias.data[0] = 20.0
        attn.gate.score.bias.data[1:] -= 4.0
    cache = ag.AttnGateCache()
    model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
    report = cache.memory_report()
    layers, rows, heads = 2, 2, 4
    assert report.pages_held <= report.pages_needed + layers * rows * heads
    lengths = torch.stack([layer.kv.lengths for layer in cache.layers])
    assert (lengths[:, :, 0] == 256).all() and lengths[:, :, 1:].float().mean() < 64
    page_bytes = 2 * 16 * 32 * 4
    assert report.kv_bytes == report.pages_held * page_bytes + sum(layer.window.nbytes for layer in cache.layers)
    # A (B, H, C, D) rectangle would hold every head at the longest one's 256 rows.
    rectangle = layers * rows * heads * 256 * 2 * 32 * 4
    assert report.kv_bytes < 0.5 * rectangle


@pytest.mark.parametrize("chunk", [0, 8])
@torch.no_grad()
def test_a_wide_window_holds_no_kept_row_twice(chunk):
    # With w = 12 and about half of the tokens evicted, every kept token is stored once: in the ring while it is
    # recent, in the pages after. Held rows = the rows the next query attends to, plus at most the one ring slot per
    # (layer, row, head) that holds the evicted token just leaving the window (page_size 1: no page rounding).
    window = 12
    model = ag.add_attention_gates(make_model("llama"), ag.AttentionGateConfig(head_dim=8, protect_recent=window,
                                                                               prefill_chunk=chunk))
    randomize_gates(model, seed=4)
    ids = random_ids(2, 70, seed=6)
    calibrate_gate_bias(model, ids, 0.5)
    cache = ag.AttnGateCache(page_size=1)
    key = cache_kwarg(model)
    out = model(input_ids=ids, use_cache=True, **{key: cache})
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(20):  # decode steps move kept tokens from the ring to the pages one by one
        token = model(input_ids=token, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
    report = cache.memory_report()
    assert 0.3 < report.eviction_ratio < 0.7
    c = model.config
    layers, rows, heads = c.num_hidden_layers, 2, c.num_key_value_heads
    row_bytes = 2 * (c.hidden_size // c.num_attention_heads) * 4  # one K and one V row, float32
    flags = layers * rows * heads * 2 * window
    held_rows = (report.kv_bytes - flags) // row_bytes
    assert report.kv_bytes == held_rows * row_bytes + flags
    assert report.kept_rows <= held_rows <= report.kept_rows + layers * rows * heads


@torch.no_grad()
def test_a_wide_window_on_a_short_prompt_holds_the_prompt_not_the_window():
    # w = 256 and 20 tokens: the ring grows with the tokens (in steps of 16 slots), so it holds 32 slots, not 256.
    model = ag.add_attention_gates(make_model("llama"), ag.AttentionGateConfig(head_dim=8, protect_recent=256))
    cache = ag.AttnGateCache(page_size=1)
    _prefill_and_decode(model, cache, random_ids(2, 17, seed=8), steps=3)
    report = cache.memory_report()
    c = model.config
    layers, rows, heads = c.num_hidden_layers, 2, c.num_key_value_heads
    row_bytes = 2 * (c.hidden_size // c.num_attention_heads) * 4
    assert report.eviction_ratio == 0.0 and report.dense_valid_bytes == layers * rows * heads * 20 * row_bytes
    assert report.kv_bytes == layers * rows * heads * 32 * (row_bytes + 2)
    assert all(layer.window.capacity == 32 for layer in cache.layers)
