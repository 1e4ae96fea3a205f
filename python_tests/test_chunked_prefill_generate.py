"""A long prompt through ``generate(..., prefill_chunk_size=N)`` with an ``AttnGateCache``: transformers runs one forward
per chunk of the prompt, the cache gates and stores each chunk before the next. The attention rule does not depend
on where chunks start, so the chunked run must give what one forward gives: the same greedy tokens with no eviction
(and the base model's), and with about half the tokens evicted the same flags, the same memory and the same tokens,
on left-padded batches."""

from __future__ import annotations

import pytest
import torch

import attngate_ext as ag
from attngate_ext import AttnGateCache
from attngate_ext.models.calibration import randomize_gates
from helpers.models import left_pad, make_model, random_ids

NEW_TOKENS = 12


def _prompts():
    return left_pad([random_ids(1, 150, seed=11)[0], random_ids(1, 97, seed=12)[0]])


def _generate(model, chunk, **cache_options):
    ids, mask = _prompts()
    cache = AttnGateCache(**cache_options)
    calls = []
    handle = model.model.register_forward_hook(lambda module, args, output: calls.append(1))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=0, prefill_chunk_size=chunk, output_scores=True,
                         return_dict_in_generate=True, **{ag.cache_kwarg(model): cache})
    handle.remove()
    prompt_calls = 1 if chunk is None else -(-ids.shape[1] // chunk)
    assert len(calls) == prompt_calls + NEW_TOKENS - 1  # the prompt really went in chunks
    return out.sequences, torch.stack(out.scores, dim=1), cache


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@torch.no_grad()
def test_without_eviction_chunked_equals_one_forward_and_the_base_model(kind):
    model = make_model(kind)
    ids, mask = _prompts()
    base = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, pad_token_id=0)
    ag.add_attention_gates(model)  # fresh gates keep every token
    whole, whole_scores, _ = _generate(model, None)
    for chunk in (16, 33):
        tokens, scores, cache = _generate(model, chunk)
        assert torch.equal(tokens, whole) and torch.equal(tokens, base)
        torch.testing.assert_close(scores, whole_scores, rtol=1e-4, atol=1e-4)
        assert cache.memory_report().eviction_ratio == 0.0


@pytest.mark.parametrize("window,sinks", [(1, 0), (6, 2)])
@torch.no_grad()
def test_with_eviction_chunked_keeps_the_same_tokens_and_memory(window, sinks):
    model = ag.add_attention_gates(make_model("llama"),
                                   ag.AttentionGateConfig(protect_recent=window, sink_tokens=sinks))
    randomize_gates(model, seed=7)  # content-dependent flags, about half evicted
    whole, whole_scores, whole_cache = _generate(model, None)
    ratio = whole_cache.memory_report().eviction_ratio
    assert 0.25 < ratio < 0.85
    for chunk in (16, 40):
        tokens, scores, cache = _generate(model, chunk)
        # The gate is causal and the rule is positional: the same flags whatever the chunking ...
        for chunked_layer, whole_layer in zip(cache.layers, whole_cache.layers):
            assert torch.equal(chunked_layer.kv.lengths, whole_layer.kv.lengths)
        assert cache.memory_report().kept_rows == whole_cache.memory_report().kept_rows
        # ... hence the same attention up to rounding, and the same greedy tokens.
        torch.testing.assert_close(scores, whole_scores, rtol=1e-4, atol=1e-4)
        assert torch.equal(tokens, whole)


@torch.no_grad()
def test_a_budget_holds_after_every_prompt_chunk():
    model = ag.add_attention_gates(make_model("llama"), ag.AttentionGateConfig(protect_recent=4))
    randomize_gates(model, seed=7)
    ids, mask = _prompts()
    budget, cache, calls = 40, AttnGateCache(max_tokens_per_head=40), []

    def check(module, args, output):  # after every forward: each prompt chunk, then each decode step
        calls.append(args[0].shape[1] if args else 0)
        for layer in cache.layers:
            assert int(layer.kv.lengths.max()) + layer.window.capacity <= budget  # pages plus the window ring

    handle = model.model.register_forward_hook(check)
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                   prefill_chunk_size=32, **{ag.cache_kwarg(model): cache})
    handle.remove()
    assert len(calls) >= ids.shape[1] // 32 + 3  # the prompt went in chunks, then the decode steps
