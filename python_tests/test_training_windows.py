"""train --window-choices: a window drawn per step (repeatable on resume), recorded in the history; the gates are
saved with --window."""

from __future__ import annotations

import json

import torch

from attngate_ext.train import main as train_main
from attngate_ext.training.train import window_for_step

from helpers.models import make_model, make_tokenizer

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(60))


def test_window_for_step_is_a_function_of_seed_and_step():
    draws = [window_for_step([2, 8, 32], 0, step) for step in range(60)]
    assert draws == [window_for_step([2, 8, 32], 0, step) for step in range(60)]
    assert set(draws) == {2, 8, 32}
    assert draws != [window_for_step([2, 8, 32], 1, step) for step in range(60)]


def test_cli_trains_over_window_choices_and_resumes_exactly(tmp_path):
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    (tmp_path / "doc.txt").write_text(TEXT)

    def run(out, *extra):
        train_main(["--model", str(model_dir), "--text", str(tmp_path / "doc.txt"), "--out", str(tmp_path / out),
                    "--seq-len", "48", "--batch-size", "2", "--no-progress", "--warmup", "1", "--steps", "4",
                    "--objective", "distill", "--window-choices", "2", "8", "--window", "4", "--save-every", "2",
                    *extra])
        return json.loads((tmp_path / out / "report.json").read_text())

    straight = run("a")
    run("b", "--stop-after", "2")
    resumed = run("b", "--resume")
    assert [h["window"] for h in straight["history"]] == [window_for_step([2, 8], 0, s) for s in range(4)]
    assert [h["window"] for h in resumed["history"]] == [h["window"] for h in straight["history"]][2:]
    assert straight["gate_config"]["protect_recent"] == 4
    saved = json.loads((tmp_path / "a" / "gates" / "attention_gates.json").read_text())
    assert saved["gate_config"]["protect_recent"] == 4
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "gates" / "attention_gates.safetensors")
    b = load_file(tmp_path / "b" / "gates" / "attention_gates.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
