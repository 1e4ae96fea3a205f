"""AttnGateCache memory accounting and capacity, gate save/load, and the errors of the model wiring."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import attngate_ext as ag
from attngate_ext.models.calibration import calibrate_gate_bias, randomize_gates
from attngate_ext.cache.paged_kv import PagedKV
from attngate_ext import cache_kwarg

from helpers.models import FAMILIES, make_model, random_ids


@torch.no_grad()
def test_memory_after_long_prefill_follows_eviction():
    # 8 KV heads of dim 32; the gate's own K'/V' cache (1 head of dim 8) adds h'_kv*d'/(H*D) = 3% of dense.
    model = make_model("llama", hidden_size=256, num_attention_heads=8, num_key_value_heads=8, intermediate_size=256)
    ag.add_attention_gates(model, ag.AttentionGateConfig(head_dim=8))
    randomize_gates(model, seed=1)
    ids = random_ids(1, 1024, seed=2)
    calibrate_gate_bias(model, ids, 0.5)
    cache = ag.AttnGateCache()
    model(ids, use_cache=True, **{cache_kwarg(model): cache})
    report = cache.memory_report()
    assert abs(report.eviction_ratio - 0.5) < 0.05
    dense = report.dense_bytes
    assert dense == 2 * 2 * 8 * 1024 * 32 * 4  # layers * (K, V) * heads * tokens * dim * fp32
    # Held: the kept rows in pages (at most one partly filled page per (layer, head)) and the one-slot window.
    assert report.kv_bytes <= (1 - report.eviction_ratio) * dense + 2 * 8 * (15 + 1) * 2 * 32 * 4 + 2 * 8 * 2 * 2
    assert report.pages_held <= report.pages_needed + 2 * 8
    # Allocated: the slack rule's eighth more free pages (plus a page per (layer, head)), the gates' K'/V', metadata.
    assert report.allocated_bytes / dense <= 1.125 * (1 - report.eviction_ratio) + 0.07
    assert len(report.retention_per_head) == 2 and len(report.retention_per_head[0]) == 8
    kept = sum(int(layer.kv.lengths.sum()) for layer in cache.layers)
    assert report.kept_rows == kept and report.total_rows == 2 * 8 * 1024
    # The gates' K'/V': every token (1024 rows of d' = 8 in 16-row pages); their one-slot decode ring is made by
    # the first decode step.
    assert report.gate_bytes == 2 * 2 * 1024 * 8 * 4


def test_paged_pool_grows_geometrically_and_syncs_rarely(monkeypatch):
    store = PagedKV(2, 3, 4, torch.float32, torch.device("cpu"), page_size=16)
    syncs, pools = [], set()
    real_sync = store.free_page_count  # the one read-back of the device's free count
    monkeypatch.setattr(store, "free_page_count", lambda: syncs.append(1) or real_sync())
    row = torch.randn(2, 3, 1, 4)
    for _ in range(3000):
        store.append(row, row, None)
        pools.add(store.num_pages)
    assert store.pages_used() == 2 * 3 * 188  # ceil(3000 / 16) pages per (row, head)
    held = store.pages_used()
    assert store.num_pages <= held + held // 8 + 2 * 3  # the slack rule: an eighth more, plus a page per head
    assert len(pools) <= 40  # geometric: a page at a time would take 188 reallocations
    assert len(syncs) <= 60  # free-count read-backs: the headroom grows with the pages held
    keys, _, live = store.gather()
    assert live.all() and torch.equal(keys[0, 1, 2999], row[0, 1, 0])
    store.compact(torch.arange(3000).expand(2, 3, 3000) < 100)  # keep 100 rows: 7 pages a head
    store.shrink()
    assert store.pages_used() == 2 * 3 * 7 and store.num_pages <= 2 * 3 * 7 + (2 * 3 * 7) // 8 + 2 * 3


@pytest.mark.parametrize("kind", ["qwen2", *FAMILIES])
@torch.no_grad()
def test_save_load_roundtrip(tmp_path, kind):
    model = make_model(kind)
    ag.add_attention_gates(model, ag.AttentionGateConfig(num_heads=2, protect_recent=3, sink_tokens=1))
    randomize_gates(model, seed=4)
    ids = random_ids(2, 30)
    expected = model(ids, use_cache=False).logits
    assert (expected - make_model(kind)(ids, use_cache=False).logits).abs().max() > 1e-3  # the gates evict
    ag.save_gates(model, str(tmp_path))
    fresh = make_model(kind)
    ag.load_gates(fresh, str(tmp_path))
    assert ag.gate_config(fresh) == ag.gate_config(model)
    torch.testing.assert_close(fresh(ids, use_cache=False).logits, expected)
    # Loading into a model that already has the same gates replaces the weights.
    other = make_model(kind)
    ag.add_attention_gates(other, ag.gate_config(model))
    ag.load_gates(other, str(tmp_path))
    torch.testing.assert_close(other(ids, use_cache=False).logits, expected)


def test_load_onto_a_mismatched_model_fails(tmp_path):
    model = make_model("llama")
    ag.add_attention_gates(model)
    ag.save_gates(model, str(tmp_path))
    with pytest.raises(ValueError, match="num_hidden_layers=2, this one has num_hidden_layers=3"):
        ag.load_gates(make_model("llama", num_hidden_layers=3), str(tmp_path))
    with pytest.raises(ValueError, match="hidden_size"):
        ag.load_gates(make_model("llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=2), str(tmp_path))
    different = make_model("llama")
    ag.add_attention_gates(different, ag.AttentionGateConfig(threshold=0.3))
    with pytest.raises(ValueError, match="remove_attention_gates"):
        ag.load_gates(different, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no saved attention gates"):
        ag.load_gates(make_model("llama"), str(tmp_path / "missing"))


def test_bad_configs_raise():  # unsupported models: test_model_families.py
    with pytest.raises(ValueError, match="num_kv_heads"):
        ag.add_attention_gates(make_model("llama"), ag.AttentionGateConfig(num_heads=4, num_kv_heads=3))
    model = ag.add_attention_gates(make_model("llama"))
    with pytest.raises(ValueError, match="already has attention gates"):
        ag.add_attention_gates(model)
    with pytest.raises(ValueError, match="has no attention gates"):
        ag.remove_attention_gates(make_model("llama"))


@torch.no_grad()
def test_bad_inputs_to_a_gated_model_raise():
    model = ag.add_attention_gates(make_model("mistral"))
    ids = random_ids(2, 8)
    with pytest.raises(ValueError, match="2-D"):
        model(ids, attention_mask=torch.ones(2, 1, 8, 8, dtype=torch.bool))
    filled = DynamicCache()
    filled.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 0)
    with pytest.raises(ValueError, match="cannot continue from a DynamicCache"):
        model(ids, use_cache=True, **{cache_kwarg(model): filled})
    cache = ag.AttnGateCache()
    model(ids, use_cache=True, **{cache_kwarg(model): cache})
    with pytest.raises(ValueError, match="holds a batch of 2"):
        model(random_ids(3, 1), use_cache=True, **{cache_kwarg(model): cache})
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(4)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        model(random_ids(1, 600), use_cache=False)  # the tiny Mistral has a 512-token window


@torch.no_grad()
def test_an_ungated_model_refuses_the_gated_cache():
    model = make_model("llama")
    with pytest.raises(RuntimeError, match="add_attention_gates"):
        model(random_ids(1, 4), use_cache=True, **{cache_kwarg(model): ag.AttnGateCache()})


def test_empty_cache_report():
    report = ag.AttnGateCache().memory_report()
    assert report.allocated_bytes == 0 and report.eviction_ratio == 0.0
    assert list(report.as_dict()) == [  # the keys of the report's dict, in their order
        "held_bytes", "kv_bytes", "gate_bytes", "free_page_bytes", "metadata_bytes", "allocated_bytes", "dense_bytes",
        "dense_valid_bytes", "pages_held", "pages_free", "pages_needed", "rounding_bytes", "page_size", "kept_rows",
        "total_rows", "eviction_ratio", "retention_per_layer", "retention_per_head"]
