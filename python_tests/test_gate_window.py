"""A local gate (AttentionGateConfig.attention_window W > 0): its attention sees the last W slots only, the same in the
no-cache forward, chunked prefill and decoding, and its K'/V' cost a W-slot ring instead of every token."""

from __future__ import annotations

import math

import pytest
import torch

import attngate_ext as ag
from attngate_ext.models.calibration import calibrate_gate_bias, randomize_gates
from attngate_ext.training.attention_targets import gate_logits
from attngate_ext import cache_kwarg

from helpers.gated import gated_model, gated_retention, incremental_logits
from helpers.models import FAMILIES, left_pad, make_model, random_ids


def _gated(eviction=0.5, **config):
    model = ag.add_attention_gates(make_model("mistral"), ag.AttentionGateConfig(**config))
    randomize_gates(model, seed=1)
    calibrate_gate_bias(model, random_ids(2, 48, seed=7), eviction)
    return model


def test_gate_attention_sees_the_last_w_slots():
    gate = ag.AttentionGate(32, 2, ag.AttentionGateConfig(head_dim=8, num_heads=4, num_kv_heads=2, attention_window=5))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 12, 8, generator=g) for n in (4, 2, 2))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    for key_valid in (None, valid):
        out = gate.attention(q, k, v, key_valid)
        expected = torch.empty_like(out)
        for i in range(12):
            for h in range(4):
                for b in range(2):
                    cols = [j for j in range(12)
                            if (i - 5 < j <= i and (key_valid is None or key_valid[b, j])) or j == i]
                    w = torch.softmax(q[b, h, i] @ k[b, h // 2, cols].T / math.sqrt(8), dim=-1)
                    expected[b, h, i] = w @ v[b, h // 2, cols]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 7])
@pytest.mark.parametrize("window", [1, 4])
@torch.no_grad()
def test_cached_prefill_and_decoding_match_the_full_forward(chunk, window):
    model = _gated(protect_recent=window, prefill_chunk=chunk, sink_tokens=2, attention_window=6)
    ids = random_ids(2, 60, seed=3)
    full = model(ids, use_cache=False).logits
    cache = ag.AttnGateCache()
    key = cache_kwarg(model)
    logits = [model(ids[:, :40], use_cache=True, **{key: cache}).logits]
    for t in range(40, 60):
        logits.append(model(ids[:, t : t + 1], use_cache=True, **{key: cache}).logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=1e-4, atol=1e-4)
    report = cache.memory_report()
    assert 0.25 < report.eviction_ratio < 0.75
    # A full-attention gate decides differently: the window really changes the gate.
    wide = _gated(protect_recent=window, prefill_chunk=chunk, sink_tokens=2)
    assert (wide(ids, use_cache=False).logits - full).abs().max() > 1e-3


@pytest.mark.parametrize("kind", FAMILIES)
@torch.no_grad()
def test_local_gates_of_every_family_decode_as_their_full_forward(kind):
    # The gate reads the layer input with its own projections (no q/k norms), and Gemma's sliding-window layers have
    # no gate: a local gate composes with every family's gated attention, cached or not.
    ids = random_ids(2, 50, seed=3)
    model = gated_model(kind, protect_recent=2, sink_tokens=1, prefill_chunk=7, attention_window=6,
                        calibration_ids=ids)
    full = model(ids, use_cache=False).logits
    got, cache = incremental_logits(model, ids, 23, step=1)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)
    assert 0.3 < 1 - gated_retention(model, cache) < 0.7  # the gated layers really evict about half
    rings = [layer.gate_kv.ring.capacity for layer in cache.layers if layer.gate_kv is not None]
    assert rings and all(c <= 6 for c in rings)  # the gates' K'/V' stay a 6-slot ring
    assert all(layer.gate_kv.pages.pages_used() == 0 for layer in cache.layers if layer.gate_kv is not None)


@torch.no_grad()
def test_left_padded_batch_matches_the_full_forward():
    model = _gated(protect_recent=3, sink_tokens=1, prefill_chunk=5, attention_window=4)
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (9, 16, 13)])
    extra = random_ids(3, 6, seed=11)
    ids, mask = torch.cat([ids, extra], dim=1), torch.cat([mask, torch.ones_like(extra)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    full = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    cache, key = ag.AttnGateCache(), cache_kwarg(model)
    step = [model(ids[:, :16], attention_mask=mask[:, :16], position_ids=positions[:, :16], use_cache=True,
                  **{key: cache}).logits]
    for t in range(16, ids.shape[1]):
        step.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=positions[:, t : t + 1],
                          use_cache=True, **{key: cache}).logits)
    valid = mask.bool()
    torch.testing.assert_close(torch.cat(step, dim=1)[valid], full[valid], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_the_local_gates_k_v_cost_a_ring_whatever_the_length():
    gate_bytes = {}
    for W, T in ((0, 64), (0, 256), (8, 64), (8, 256)):
        model = _gated(protect_recent=4, attention_window=W)
        cache = ag.AttnGateCache()
        model(random_ids(1, T, seed=2), use_cache=True, **{cache_kwarg(model): cache})
        gate_bytes[W, T] = cache.memory_report().gate_bytes
    layers, d = 2, ag.gate_config(model).head_dim
    ring = layers * (2 * 8 * d * 4 + 2 * 8)  # K' and V' float32 rows, plus the ring's two flags per slot
    assert gate_bytes[8, 64] == gate_bytes[8, 256] == ring
    assert gate_bytes[0, 256] > 3 * gate_bytes[0, 64] and gate_bytes[0, 64] > ring


def test_gate_logits_of_the_attention_objective_use_the_window():
    model = _gated(protect_recent=4, attention_window=3)
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(1, 20, 64, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(20).view(1, -1)
    cos, sin = attn.gate_rope(hidden, None, positions)
    with torch.no_grad():
        probs = attn.gate(hidden, cos, sin).probs
        torch.testing.assert_close(torch.sigmoid(gate_logits(attn.gate, hidden, cos, sin)), probs)


def test_attention_window_is_validated():
    with pytest.raises(ValueError, match="attention_window"):
        ag.AttentionGateConfig(attention_window=-1)
    assert ag.AttentionGateConfig.from_dict({"attention_window": 16}).attention_window == 16


def test_the_window_is_a_rule_field_and_a_training_option():
    from attngate_ext.training.train import _config_overrides, parse_args

    model = _gated(protect_recent=4)
    from attngate_ext.models.model import update_gate_config

    assert update_gate_config(model, attention_window=8).attention_window == 8
    assert all(g.config.attention_window == 8 for g in ag.gates(model))
    args = parse_args(["--model", "m", "--text", "t", "--out", "o", "--gate-attention-window", "64"])
    assert _config_overrides(args) == {"attention_window": 64}
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--text", "t", "--out", "o", "--gate-attention-window", "-1"])
