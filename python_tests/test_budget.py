"""Byte budgets: the gates' threshold set for a held-byte share hits it as the cache measures it (ring, gate K'/V'
and pages included), out-of-reach budgets are reported, and a baseline's ratio is solved for a share."""

from __future__ import annotations

import math

import pytest
import torch

import attngate_ext as ag
from attngate_ext.evaluation.budget import calibrate_gate_bytes, prefill_report, ratio_for_share
from attngate_ext.models.calibration import randomize_gates
from attngate_ext import cache_kwarg

from helpers.models import make_model, random_ids


def _gated(window: int = 8, sinks: int = 2):
    model = ag.add_attention_gates(make_model("mistral"), ag.AttentionGateConfig(protect_recent=window,
                                                                                 sink_tokens=sinks))
    randomize_gates(model, seed=3)
    return model


def _held_share(model, ids, page_size):
    cache = ag.AttnGateCache(page_size)
    with torch.no_grad():
        model(ids, use_cache=True, **{cache_kwarg(model): cache})
    report = cache.memory_report()
    return report.held_bytes / report.dense_bytes, report


@pytest.mark.parametrize("page_size", [1, 4])
def test_gate_threshold_for_a_byte_budget_is_what_the_cache_holds(page_size):
    model = _gated()
    ids = random_ids(2, 160, seed=2)
    before = [g.score.bias.clone() for g in ag.gates(model)]
    result = calibrate_gate_bytes(model, ids, 0.55, page_size=page_size)
    share, report = _held_share(model, ids, page_size)  # through the full model, measured independently
    assert result["reachable"]
    assert result["held_share"] == pytest.approx(share, abs=1e-12)
    assert share == pytest.approx(0.55, abs=0.02) and share <= 0.55 + 0.003 + 1e-9
    assert result["eviction_ratio"] == pytest.approx(report.eviction_ratio, abs=1e-12)
    # The budget counts more than kept rows: the gates' K'/V' (d' = 8 of H * D = 32 per token here) and the ring.
    assert report.gate_bytes > 0 and 1 - report.eviction_ratio < share
    shifts = torch.cat([g.score.bias - b for g, b in zip(ag.gates(model), before)])
    assert torch.allclose(shifts, shifts[0].expand_as(shifts))  # one global threshold


def test_prefill_report_matches_the_model_forward():
    model = _gated()
    ids = random_ids(1, 64, seed=4)
    share, _ = _held_share(model, ids, 16)
    assert prefill_report(model, ids, page_size=16)["held_share"] == pytest.approx(share, abs=1e-12)


def test_a_budget_below_the_fixed_costs_is_out_of_reach():
    model = _gated(window=32)
    ids = random_ids(1, 96, seed=5)
    result = calibrate_gate_bytes(model, ids, 0.05, page_size=1)
    share, report = _held_share(model, ids, 1)
    assert not result["reachable"]
    assert share > 0.05 and share == pytest.approx(result["held_share"], abs=1e-12)
    # Left at the extreme: only the sinks, the window and the gates' K'/V' are held.
    fixed = (2 + 32) / 96 + report.gate_bytes / report.dense_bytes
    assert share == pytest.approx(fixed, abs=0.02)


def test_ratio_for_share_solves_a_paged_baseline():
    tokens, page = 1000, 16

    def held_at(ratio):  # rows rounded up to pages, plus a one-row ring
        rows = math.ceil((1 - ratio) * tokens - 1e-9)
        return (math.ceil(rows / page) * page + 1) / tokens

    result = ratio_for_share(held_at, 0.25)
    assert result["held_share"] <= 0.25 + 0.002
    assert result["held_share"] == pytest.approx(held_at(result["ratio"]))
    assert result["held_share"] > 0.25 - page / tokens  # within one page of the budget
    assert ratio_for_share(lambda r: 1 - r, 0.5)["ratio"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ratio_for_share(held_at, 0.0)


def test_rounding_bytes_are_the_unused_rows_of_the_pages_held():
    model = _gated()
    _, report = _held_share(model, random_ids(2, 100, seed=6), 8)
    cache_rows = 0
    expected = 0
    cache = ag.AttnGateCache(8)
    with torch.no_grad():
        model(random_ids(2, 100, seed=6), use_cache=True, **{cache_kwarg(model): cache})
    for layer in cache.layers:
        lengths = layer.kv.lengths.long()
        cache_rows += int(lengths.sum())
        row_bytes = 2 * layer.kv.key_pages.shape[-1] * layer.kv.key_pages.element_size()
        expected += int(((lengths + 7) // 8 * 8 - lengths).sum()) * row_bytes
    assert cache_rows > 0 and report.rounding_bytes == expected == cache.memory_report().rounding_bytes
    assert 0 < expected < report.kv_bytes


def test_window_for_budget_takes_the_largest_window_within_half_the_budget():
    from attngate_ext.evaluation.budget import window_for_budget

    assert window_for_budget(0.5, 1152, [64, 128, 256]) == 256  # 288 rows: half of 576
    assert window_for_budget(0.25, 1152, [256, 64, 128]) == 128  # 144
    assert window_for_budget(0.25, 4352, [64, 128, 256]) == 256
    assert window_for_budget(0.05, 1152, [64, 128]) == 64  # none fits: the smallest
    with pytest.raises(ValueError):
        window_for_budget(0.5, 100, [])
