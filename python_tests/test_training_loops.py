"""Gates train under standard training loops: a plain forward/backward in training mode and transformers.Trainer."""

from __future__ import annotations

import pytest
import torch

import attngate_ext as ag
from attngate_ext.models.calibration import calibrate_gate_bias, randomize_gates
from attngate_ext import cache_kwarg

from helpers.models import make_model, random_ids


def _gated(kind="llama", **config):
    model = ag.add_attention_gates(make_model(kind), ag.AttentionGateConfig(**config))
    model.requires_grad_(False)
    for gate in ag.gates(model):
        gate.requires_grad_(True)
    return model


def test_the_standard_training_call_reaches_every_gate_parameter():
    model = _gated("mistral", protect_recent=2)
    assert model.config.use_cache  # the default a training loop leaves alone
    model.train()
    ids = random_ids(2, 40, seed=3)
    loss = model(ids, labels=ids).loss  # use_cache left at its default
    loss.backward()
    for layer, gate in enumerate(ag.gates(model)):
        for name, param in gate.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, (layer, name)


def test_eval_mode_still_fills_the_cache():
    model = _gated(protect_recent=2)
    randomize_gates(model, seed=1)
    ids = random_ids(1, 24, seed=5)
    with torch.no_grad():
        calibrate_gate_bias(model, ids, 0.5)
    cache = ag.AttnGateCache()
    model.eval()
    model(ids, use_cache=True, **{cache_kwarg(model): cache})
    assert 0.3 < cache.memory_report().eviction_ratio < 0.7
    model.train()  # training mode cannot continue from a cache that already holds tokens
    with pytest.raises(ValueError, match="model.eval"):
        model(ids[:, :1], use_cache=True, **{cache_kwarg(model): cache})


def test_transformers_trainer_changes_the_gates_only(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (peft brings it)")
    from transformers import Trainer, TrainingArguments

    model = _gated(protect_recent=2)
    randomize_gates(model, seed=2)
    ids = random_ids(1, 32, seed=7)
    with torch.no_grad():
        calibrate_gate_bias(model, ids, 0.3)

    class GateTrainer(Trainer):
        """Adds the eviction loss to the model's own loss, as a user would."""

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            out = model(**inputs)
            retain, valid = ag.collect_retention(model)
            evict, _ = ag.eviction_loss(retain, valid, target_eviction=0.5, alpha=10.0)
            loss = out.loss + evict
            return (loss, out) if return_outputs else loss

    data = [{"input_ids": row, "labels": row} for row in random_ids(8, 32, seed=9)]
    before_gates = {k: v.clone() for k, v in ag.gate_state_dict(model).items()}
    before_model = {k: v.clone() for k, v in model.state_dict().items() if ".gate." not in k}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             logging_strategy="no", disable_tqdm=True)
    trainer = GateTrainer(model=model, args=args, train_dataset=data)
    # Recent Trainers set config.use_cache from TrainingArguments (False); older ones and many custom loops leave the
    # model's default, True. The gates must train either way.
    model.config.use_cache = True
    trainer.train()
    after_gates = ag.gate_state_dict(model)
    changed = [k for k in before_gates if not torch.equal(before_gates[k], after_gates[k])]
    assert len(changed) == len(before_gates), sorted(set(before_gates) - set(changed))
    for k, v in model.state_dict().items():
        if ".gate." not in k:
            assert torch.equal(v, before_model[k]), k


def test_default_gate_width_costs_at_most_three_percent():
    assert ag.default_gate_head_dim(3, 64) == 8  # SmolLM2-135M: the 8-dim floor wins (4.2%)
    assert ag.default_gate_head_dim(8, 128) == 24  # Llama-3-8B: 2.3%
    assert ag.default_gate_head_dim(32, 128) == 120  # Llama-2-7B: 2.9%
    assert ag.default_gate_head_dim(8, 128, gate_kv_heads=2) == 8
    assert ag.default_gate_head_dim(1, 4) == 8
    with pytest.raises(ValueError, match="model_kv_heads"):
        ag.default_gate_head_dim(0, 64)
    # A model with 8 KV heads of dim 64: d' = 8, so the gate's K'/V' cache is 8 / 512 of the dense cache.
    model = ag.add_attention_gates(make_model("llama", hidden_size=512, num_attention_heads=8,
                                              num_key_value_heads=8, num_hidden_layers=1))
    assert ag.gate_config(model).head_dim == 8
    cache = ag.AttnGateCache()
    with torch.no_grad():
        model(random_ids(1, 64), use_cache=True, **{cache_kwarg(model): cache})
    report = cache.memory_report()
    assert report.gate_bytes / report.dense_bytes == pytest.approx(8 / 512, rel=0.3)
    assert report.gate_bytes / report.dense_bytes <= 0.03


def test_eviction_loss_is_exported_at_the_top_level():
    from attngate_ext.training.losses import collect_retention, eviction_loss

    assert ag.eviction_loss is eviction_loss and "eviction_loss" in ag.__all__
    assert ag.collect_retention is collect_retention and "collect_retention" in ag.__all__
