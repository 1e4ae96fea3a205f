"""The gated model against the unmodified one, and incremental generation against one no-cache forward."""

from __future__ import annotations

import pytest
import torch

import attngate_ext as ag
from attngate_ext.models.calibration import randomize_gates
from attngate_ext import cache_kwarg

from helpers.gated import gated_model as _gated, gated_retention, incremental_logits as _incremental_logits
from helpers.models import FAMILIES, KINDS, left_pad, make_model, random_ids

STEPS = 20


def _greedy_logits(model, ids, steps, **kwargs):
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, min_new_tokens=steps, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("kind", sorted(KINDS))
@torch.no_grad()
def test_fresh_gates_change_nothing(kind):
    model = make_model(kind)
    ids = random_ids(2, 23)
    dense_prefill = model(ids, use_cache=False).logits
    dense_tokens, dense_steps = _greedy_logits(model, ids, STEPS)
    ag.add_attention_gates(model)
    torch.testing.assert_close(model(ids, use_cache=False).logits, dense_prefill, rtol=1e-5, atol=1e-5)
    tokens, steps = _greedy_logits(model, ids, STEPS)
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(steps, dense_steps, rtol=1e-5, atol=1e-5)
    # The cache really holds every token of the gated layers: nothing was evicted (the ungated sliding-window
    # layers of Gemma hold their window only).
    cache = ag.AttnGateCache()
    model.generate(ids, max_new_tokens=3, do_sample=False, **{cache_kwarg(model): cache})
    assert gated_retention(model, cache) == 1.0


@pytest.mark.parametrize("chunk", [0, 7])
@pytest.mark.parametrize("window", [1, 4])
@pytest.mark.parametrize("decode_gating", [True, False])
@torch.no_grad()
def test_incremental_matches_full_forward_under_eviction(chunk, window, decode_gating, device):
    model = _gated(protect_recent=window, prefill_chunk=chunk, decode_gating=decode_gating, sink_tokens=2).to(device)
    ids = random_ids(2, 40 + STEPS, seed=3).to(device)
    prompt = 40
    full = model(ids, use_cache=False, gate_prompt_length=prompt).logits
    step, cache = _incremental_logits(model, ids, prompt)
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    report = cache.memory_report()
    low = 0.3 if decode_gating else 0.15  # without decode gating the 20 generated tokens are all kept
    assert low < report.eviction_ratio < 0.7, report.eviction_ratio  # the gates really evict
    # Eviction changes the output: the check above is not comparing two dense runs.
    dense = make_model("mistral").to(device)(ids, use_cache=False).logits
    assert (dense - full).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["llama", *FAMILIES])
@pytest.mark.parametrize("step", [1, 9])  # one token per call, and calls of 9 tokens after the prompt
@torch.no_grad()
def test_each_family_decodes_as_its_full_forward_under_eviction(kind, step, device):
    ids = random_ids(2, 50, seed=3)
    # Calibrated on these tokens: a model with one gated layer (Gemma) varies too much from sequence to sequence.
    model = _gated(kind, protect_recent=2, sink_tokens=1, prefill_chunk=7, calibration_ids=ids).to(device)
    ids = ids.to(device)
    full = model(ids, use_cache=False).logits
    got, cache = _incremental_logits(model, ids, 23, step=step)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)
    assert 0.3 < 1 - gated_retention(model, cache) < 0.7  # the gated layers really evict about half
    dense = make_model(kind).to(device)(ids, use_cache=False).logits
    assert (dense - full).abs().max() > 1e-2


@pytest.mark.parametrize("kind", sorted(KINDS))
@torch.no_grad()
def test_incremental_matches_full_forward_left_padded(kind, device):
    model = _gated(kind, protect_recent=3, sink_tokens=1, prefill_chunk=5).to(device)
    prompts = [random_ids(1, n, seed=n)[0] for n in (9, 16, 13)]
    ids, mask = left_pad(prompts)
    extra = random_ids(3, 6, seed=11)
    ids = torch.cat([ids, extra], dim=1)
    mask = torch.cat([mask, torch.ones_like(extra)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    full = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    step, cache = _incremental_logits(model, ids, 16, attention_mask=mask, position_ids=positions)
    valid = mask.bool()
    torch.testing.assert_close(step[valid], full[valid], rtol=1e-4, atol=1e-4)
    report = cache.memory_report()
    layers, heads = len(model.model.layers), model.config.num_key_value_heads
    assert report.total_rows == int(mask.sum()) * layers * heads  # padding is never counted


@pytest.mark.parametrize("kind", ["qwen2", *FAMILIES])
@torch.no_grad()
def test_left_padded_batch_generates_what_each_prompt_generates_alone(kind):
    prompts = [random_ids(1, n, seed=20 + n)[0] for n in (5, 12, 9)]
    ids, mask = left_pad(prompts)
    model = _gated(kind, protect_recent=2, sink_tokens=1, calibration_ids=random_ids(3, 24, seed=5))
    cache = ag.AttnGateCache()
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                           **{cache_kwarg(model): cache})
    report = cache.memory_report()
    assert 0.2 < 1 - gated_retention(model, cache) < 0.8
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    assert report.total_rows == (int(mask.sum()) + 11 * 3) * layers * heads  # last token is never fed back
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert torch.equal(batch[row, -12:], alone[0, -12:]), f"prompt {row}"


@torch.no_grad()
def test_generate_without_cache_and_with_sampling():
    model = _gated("llama", protect_recent=2)
    ids = random_ids(2, 20, seed=5)
    cached = model.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    uncached = model.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.manual_seed(123)
    sampled = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20, min_new_tokens=10)
    torch.manual_seed(123)
    again = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20, min_new_tokens=10)
    assert sampled.shape == (2, 30) and torch.equal(sampled, again)


@torch.no_grad()
def test_beam_search_on_fresh_gates_matches_dense():
    model = make_model("mistral")
    ids = random_ids(2, 12, seed=8)
    dense = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False, min_new_tokens=8)
    ag.add_attention_gates(model)
    assert torch.equal(model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False, min_new_tokens=8), dense)


@torch.no_grad()
def test_remove_attention_gates_restores_the_model():
    model = make_model("qwen2")
    ids = random_ids(1, 10)
    before = model(ids).logits
    _ = ag.add_attention_gates(model)
    randomize_gates(model)
    ag.remove_attention_gates(model)
    assert not any(isinstance(m, ag.AttentionGate) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_fresh_gates_change_nothing_in_half_precision(dtype):
    model = make_model("mistral").to(dtype)
    ids = random_ids(2, 30)
    dense = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ag.add_attention_gates(model)
    assert next(iter(ag.gates(model)[0].parameters())).dtype == dtype
    gated = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    torch.testing.assert_close(torch.stack(gated.logits), torch.stack(dense.logits), rtol=0, atol=2e-2)


@torch.no_grad()
def test_beam_search_under_eviction_matches_no_cache_beam_search():
    model = _gated("llama", protect_recent=2, sink_tokens=1)
    ids = random_ids(2, 14, seed=9)
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False, min_new_tokens=8)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))
