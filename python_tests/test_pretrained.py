"""The gates shipped with the package: present, small, loadable by name into a model of SmolLM2-135M's shape."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

import attngate_ext as ag
from attngate_ext.pretrained import _shift_for, matching_pretrained_gates
from attngate_ext import cache_kwarg

from helpers.models import make_model, random_ids

NAME = "smollm2-135m-instruct"
# SmolLM2-135M-Instruct's attention shape; a small vocabulary and MLP keep the test model cheap.
SHAPE = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
             intermediate_size=64, rope_theta=100000.0)


def test_the_shipped_gates_are_listed_small_and_carry_a_card():
    assert NAME in ag.list_pretrained_gates()
    path = Path(ag.pretrained_gates(NAME))
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 10 * 2**20, size
    card = (path / "README.md").read_text()
    for needed in ("Data", "Settings", "Steps", "Time", "Results"):
        assert needed in card, needed
    meta = json.loads((path / "attention_gates.json").read_text())
    assert meta["model"] == {"hidden_size": 576, "num_hidden_layers": 30, "num_key_value_heads": 3}
    with pytest.raises(KeyError, match=NAME):
        ag.pretrained_gates("no-such-gates")


def test_load_by_name_with_a_stored_threshold_and_evict():
    model = make_model("llama", **SHAPE)
    ag.load_pretrained_gates(model, NAME)
    trained = torch.cat([g.score.bias.detach().clone() for g in ag.gates(model)])
    ag.remove_attention_gates(model)
    ag.load_pretrained_gates(model, NAME, eviction=0.75)
    shifted = torch.cat([g.score.bias.detach() for g in ag.gates(model)])
    torch.testing.assert_close(shifted - trained, torch.full_like(trained, _shift_for(NAME, 0.75)))
    assert _shift_for(NAME, 0.5) > _shift_for(NAME, 0.75)  # evicting more lowers every bias
    cache = ag.AttnGateCache()
    with torch.no_grad():
        model(random_ids(1, 300), use_cache=True, **{cache_kwarg(model): cache})
    report = cache.memory_report()
    config = ag.gate_config(model)
    floor = (config.sink_tokens + config.protect_recent - 1) * 3 * 30  # sinks and the window always stay
    assert floor <= report.kept_rows <= report.total_rows == 300 * 3 * 30 and report.gate_bytes > 0
    with pytest.raises(ValueError, match="outside the stored range"):
        ag.load_pretrained_gates(model, NAME, eviction=0.99)


def test_evaluate_picks_the_shipped_gates_for_a_matching_model():
    config = types.SimpleNamespace(num_hidden_layers=30, hidden_size=576, num_key_value_heads=3,
                                   num_attention_heads=9, vocab_size=49152)
    assert matching_pretrained_gates(types.SimpleNamespace(config=config)) == NAME
    config.vocab_size = 100
    assert matching_pretrained_gates(types.SimpleNamespace(config=config)) is None
