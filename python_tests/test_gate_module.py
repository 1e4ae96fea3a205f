"""AttentionGateConfig validation/JSON and the AttentionGate module: init keeps all, causality, incremental scoring."""

from __future__ import annotations

import pytest
import torch

from attngate_ext.gate.config import AttentionGateConfig
from attngate_ext.gate.gate import AttentionGate


def _rope_tables(B: int, T: int, d: int, offset: int = 0):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    pos = torch.arange(offset, offset + T).float()
    freqs = torch.outer(pos, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().expand(B, T, d), emb.sin().expand(B, T, d)


def _gate(H=3, hidden=32, **cfg) -> AttentionGate:
    torch.manual_seed(0)
    return AttentionGate(hidden, H, AttentionGateConfig(head_dim=16, **cfg)).eval()


def test_config_json_roundtrip():
    cfg = AttentionGateConfig(num_heads=8, num_kv_heads=2, head_dim=64, threshold=0.3, sink_tokens=4,
                              protect_recent=8, prefill_chunk=256)
    assert AttentionGateConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    "field,value",
    [("num_heads", 0), ("num_kv_heads", 3), ("threshold", 1.5), ("threshold", float("nan")), ("sink_tokens", -1),
     ("protect_recent", 0), ("prefill_chunk", -4), ("head_dim", 15), ("rope", "yes"), ("init_bias", float("inf"))],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        AttentionGateConfig(**{field: value})


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown AttentionGateConfig fields"):
        AttentionGateConfig.from_dict({"num_heads": 4, "tau": 0.5})


def test_fresh_gate_keeps_everything():
    gate = _gate()
    x = torch.randn(2, 50, 32) * 3
    cos, sin = _rope_tables(2, 50, 16)
    out = gate(x, cos, sin)
    assert out.keep.all()
    assert torch.allclose(out.probs, torch.full_like(out.probs, torch.sigmoid(torch.tensor(3.0)).item()), atol=0.01)


def test_gate_is_causal_and_incremental_scoring_matches_full():
    gate = _gate()
    with torch.no_grad():
        gate.score.weight.normal_(std=2.0)
        gate.score.bias.zero_()
    B, T = 2, 24
    x = torch.randn(B, T, 32)
    cos, sin = _rope_tables(B, T, 16)
    full = gate(x, cos, sin)
    assert 0.1 < full.keep.float().mean() < 0.9  # the perturbed gate really decides
    # Changing later tokens never changes earlier flags.
    x2 = x.clone()
    x2[:, 15:] = torch.randn(B, T - 15, 32)
    assert torch.equal(gate(x2, cos, sin).keep[..., :15], full.keep[..., :15])
    # Prefill 10, then one token at a time with the gate's K'/V' cache.
    first = gate(x[:, :10], cos[:, :10], sin[:, :10])
    past = (first.key, first.value, torch.ones(B, 10, dtype=torch.bool))
    probs = [first.probs]
    for t in range(10, T):
        step = gate(x[:, t : t + 1], cos[:, t : t + 1], sin[:, t : t + 1], position_offset=t, past=past)
        past = (torch.cat([past[0], step.key], 2), torch.cat([past[1], step.value], 2),
                torch.cat([past[2], torch.ones(B, 1, dtype=torch.bool)], 1))
        probs.append(step.probs)
    torch.testing.assert_close(torch.cat(probs, dim=-1), full.probs, rtol=1e-5, atol=1e-6)


def test_padding_is_never_kept_and_does_not_leak():
    gate = _gate(sink_tokens=2)
    with torch.no_grad():
        gate.score.weight.normal_(std=2.0)
    B, T, pad = 2, 12, 3
    x = torch.randn(B, T, 32)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :pad] = False
    cos, sin = _rope_tables(B, T, 16)
    out = gate(x, cos, sin, valid=valid)
    assert not out.keep[1, :, :pad].any()
    assert torch.isfinite(out.probs).all()
    # Row 1 without its padding (positions shifted so RoPE sees the same relative offsets) gives the same probs.
    alone = gate(x[1:, pad:], cos[:1, : T - pad], sin[:1, : T - pad])
    shifted = gate(x[1:, pad:], cos[1:, pad:], sin[1:, pad:])
    torch.testing.assert_close(out.probs[1:, :, pad:], shifted.probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone.probs, shifted.probs, rtol=1e-4, atol=1e-5)  # RoPE: only relative positions


def test_probs_are_differentiable_in_training():
    gate = _gate().train()
    x = torch.randn(1, 8, 32, requires_grad=True)
    cos, sin = _rope_tables(1, 8, 16)
    out = gate(x, cos, sin)
    out.probs.sum().backward()
    assert gate.score.bias.grad is not None and torch.isfinite(gate.q_proj.weight.grad).all()
    assert out.keep.dtype == torch.bool
