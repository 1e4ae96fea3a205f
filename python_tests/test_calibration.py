"""Threshold calibration hits the eviction the cache measures (window and sinks included); rule fields update."""

from __future__ import annotations

import pytest
import torch

import attngate_ext as ag
from attngate_ext.models.calibration import calibrate_gate_threshold, randomize_gates
from attngate_ext import cache_kwarg

from helpers.models import make_model, random_ids


def _measured(model, ids):
    cache = ag.AttnGateCache()
    with torch.no_grad():
        model(ids, use_cache=True, **{cache_kwarg(model): cache})
    return cache.memory_report()


@pytest.mark.parametrize("per_head", [False, True])
def test_calibrated_threshold_gives_the_measured_ratio(per_head):
    model = ag.add_attention_gates(make_model("mistral"), ag.AttentionGateConfig(protect_recent=8, sink_tokens=2))
    randomize_gates(model, seed=3)
    ids = random_ids(2, 96, seed=2)
    predicted = calibrate_gate_threshold(model, ids, 0.6, per_head=per_head)
    report = _measured(model, ids)
    assert predicted == pytest.approx(report.eviction_ratio, abs=1e-9)  # the cache's own measure
    assert report.eviction_ratio == pytest.approx(0.6, abs=0.03)
    per_head_retention = torch.tensor(report.retention_per_head)
    if per_head:
        assert (per_head_retention - 0.4).abs().max() < 0.06
    else:  # one threshold: heads keep different fractions
        assert per_head_retention.std() > 0.02


def test_global_threshold_is_one_shift_of_every_bias():
    model = ag.add_attention_gates(make_model("llama"), ag.AttentionGateConfig(protect_recent=4))
    randomize_gates(model, seed=1)
    before = [g.score.bias.clone() for g in ag.gates(model)]
    calibrate_gate_threshold(model, random_ids(1, 64), 0.5)
    shifts = torch.cat([g.score.bias - b for g, b in zip(ag.gates(model), before)])
    assert torch.allclose(shifts, shifts[0].expand_as(shifts))


def test_update_gate_config_changes_the_rule_fields_only():
    model = ag.add_attention_gates(make_model("llama"))
    config = ag.update_gate_config(model, protect_recent=16, sink_tokens=4)
    assert ag.gate_config(model) == config and config.protect_recent == 16
    assert all(g.config is config for g in ag.gates(model))
    with pytest.raises(ValueError, match="head_dim"):
        ag.update_gate_config(model, head_dim=4)
