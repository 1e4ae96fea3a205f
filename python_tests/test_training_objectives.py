"""The trainer's objectives: future-attention targets, distillation, the eviction-target ramp, and the CLI runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

import attngate_ext as ag
from attngate_ext.train import main as train_main
from attngate_ext.training.attention_targets import future_attention_scores, trainable_tokens
from attngate_ext.training.losses import distillation_loss, eviction_target
from attngate_ext.training.objectives import OBJECTIVES, STEPS, ObjectiveConfig

from helpers.models import make_model, make_tokenizer

TEXT = "".join(f"ACT {i}. Enter the king, speaking of {i * 7 % 11} crowns and a horse.\n" for i in range(60))


def _naive_scores(q, k, v, wo, x, window, scale, softcap=0.0):
    B, Hq, T, D = q.shape
    H = k.shape[1]
    G = Hq // H
    out = torch.full((B, H, T), 1e-12, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            g = h // G
            logits = (q[b, h].double() @ k[b, g].double().T) * scale
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            for i in range(T):
                probs = torch.softmax(logits[i, : i + 1], dim=0)
                for j in range(i + 1):
                    if i - j < window:
                        continue
                    contribution = probs[j] * (wo[:, h * D : (h + 1) * D].double() @ v[b, g, j].double()).norm()
                    contribution = contribution / x[b, i].double().norm()
                    out[b, g, j] = max(out[b, g, j], contribution)
    return out.log()


def test_future_attention_scores_match_a_naive_loop():
    torch.manual_seed(0)
    B, Hq, H, T, D, d = 2, 4, 2, 13, 8, 24
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    wo, x = torch.randn(d, Hq * D), torch.randn(B, T, d)
    for window in (1, 3):
        got = future_attention_scores(q, k, v, wo, x, None, window, D**-0.5, block_size=5)
        torch.testing.assert_close(got.double(), _naive_scores(q, k, v, wo, x, window, D**-0.5), rtol=1e-4,
                                   atol=1e-4)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, -4:] = False  # right padding: padded queries add nothing
    got = future_attention_scores(q, k, v, wo, x, valid, 2, D**-0.5)
    ref = _naive_scores(q[1:, :, :-4], k[1:, :, :-4], v[1:, :, :-4], wo, x[1:, :-4], 2, D**-0.5)
    torch.testing.assert_close(got[1:, :, :-4].double(), ref, rtol=1e-4, atol=1e-4)
    # Soft-capped scores (Gemma 2): the targets follow the model's capped attention.
    got = future_attention_scores(q, k, v, wo, x, None, 2, 1.0, softcap=1.5)
    torch.testing.assert_close(got.double(), _naive_scores(q, k, v, wo, x, 2, 1.0, softcap=1.5), rtol=1e-4, atol=1e-4)


def test_trainable_tokens_skip_sinks_padding_and_the_unseen_tail():
    valid = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    mask = trainable_tokens(valid, (2, 10), window=2, sinks=1, min_future=3, device=torch.device("cpu"))
    # token j counts when 10 - j - 2 >= 3 (j <= 5) and j >= 1; in the padded row 6 - j - 2 >= 3 (j <= 1)
    assert mask[0].tolist() == [False, True, True, True, True, True, False, False, False, False]
    assert mask[1].tolist() == [False, True] + [False] * 8


def test_distillation_loss_is_the_kl_and_zero_for_equal_logits():
    teacher = torch.randn(2, 5, 7)
    assert distillation_loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    p, logq = torch.softmax(teacher, -1), torch.log_softmax(student, -1)
    kl = (p * (p.log() - logq)).sum(-1)
    assert distillation_loss(student, teacher, mask).item() == pytest.approx(float(kl[mask.bool()].mean()), rel=1e-5)


def test_distillation_loss_never_rounds_below_zero():
    """Equal distributions from shifted logits: their KL is 0, and rounds to tiny negative numbers unless clamped."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        teacher = torch.randn(2, 8, 50, generator=g) * 5
        for shift in (3.0, 1e2, 1e3):
            loss = distillation_loss(teacher + shift, teacher)
            assert 0.0 <= loss.item() < 1e-4


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])  # Gemma 2: soft-capped, one ungated sliding-window layer
def test_an_objective_runs_in_a_loop_of_ones_own(kind):
    """An ObjectiveConfig is all an objective needs: the step runs the backward, gradients reach the gates only."""
    model = ag.add_attention_gates(make_model(kind))
    model.requires_grad_(False)
    for gate in ag.gates(model):
        gate.requires_grad_(True)
    model.train()
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for name in OBJECTIVES:
        model.zero_grad(set_to_none=True)
        logs = STEPS[name](model, batch, 0.5, ObjectiveConfig(alpha=5.0, min_future=4))
        assert math.isfinite(logs["loss"]) and logs["target"] == 0.5, name
        grads = [p.grad for gate in ag.gates(model) for p in gate.parameters()]
        assert any(g is not None and bool(g.abs().sum() > 0) for g in grads), name
        assert all(p.grad is None for n, p in model.named_parameters() if ".gate." not in n), name


def test_eviction_target_ramps_linearly():
    assert [eviction_target(s, 0.6, 3) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.6, 0.6])
    assert eviction_target(0, 0.6, 0) == 0.6


@pytest.fixture
def tiny_dirs(tmp_path):
    model_dir = tmp_path / "model"
    make_model("mistral").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "play.txt"
    text.write_text(TEXT)
    return model_dir, text


def _train(model_dir, text, out, *extra):
    train_main(["--model", str(model_dir), "--text", str(text), "--out", str(out), "--seq-len", "96",
                "--batch-size", "2", "--no-progress", "--warmup", "2", "--save-every", "100", *extra])
    return json.loads((out / "report.json").read_text())


def test_attention_objective_learns_the_scores_and_sets_the_threshold(tiny_dirs, tmp_path):
    model_dir, text = tiny_dirs
    report = _train(model_dir, text, tmp_path / "att", "--objective", "attention", "--steps", "40", "--lr", "0.02",
                    "--window", "4", "--sinks", "1", "--min-future", "8", "--target-eviction", "0.6")
    losses = [h["loss"] for h in report["history"]]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5  # the regression fits
    assert report["threshold_eviction"] == pytest.approx(0.6, abs=0.05)
    config = json.loads((tmp_path / "att" / "gates" / "attention_gates.json").read_text())["gate_config"]
    assert config["protect_recent"] == 4 and config["sink_tokens"] == 1 and config["head_dim"] == 8


def test_distill_objective_with_a_ramp_reaches_the_target(tiny_dirs, tmp_path):
    model_dir, text = tiny_dirs
    report = _train(model_dir, text, tmp_path / "kd", "--objective", "distill", "--steps", "60", "--lr", "0.05",
                    "--alpha", "20", "--target-eviction", "0.5", "--target-ramp", "20", "--window", "2")
    targets = [h["target"] for h in report["history"]]
    assert targets[0] == pytest.approx(0.025) and targets[19:] == pytest.approx([0.5] * 41)
    tail = report["history"][-10:]
    assert abs(sum(h["retention"] for h in tail) / 10 - 0.5) < 0.1
    assert all(math.isfinite(h["task_loss"]) and h["task_loss"] >= 0 for h in report["history"])
