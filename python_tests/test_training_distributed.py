"""Data-parallel training through torchrun (gloo, 2 CPU processes) matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from attngate_ext import gate_state_dict
from attngate_ext.train import main as train_main
from attngate_ext.training.train import load_model, parse_args

from helpers.models import make_model, make_tokenizer

TEXT = "".join(f"Scene {i}: the queen speaks of {i * 5 % 9} ships and the sea.\n" for i in range(80))
ARGS = ["--seq-len", "64", "--no-progress", "--warmup", "2", "--steps", "5", "--lr", "0.05", "--alpha", "20",
        "--target-eviction", "0.5", "--save-every", "100"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(model_dir, text, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={_free_port()}", "-m", "attngate_ext.train", "--model", str(model_dir), "--text", str(text),
           "--out", str(out), "--batch-size", "2", *ARGS, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def _gates(out):
    from safetensors.torch import load_file

    return load_file(out / "gates" / "attention_gates.safetensors")


@pytest.fixture
def tiny_dirs(tmp_path):
    model_dir = tmp_path / "model"
    make_model("mistral").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "scenes.txt"
    text.write_text(TEXT)
    return model_dir, text


def test_two_processes_match_one_with_the_same_global_batch_and_resume(tiny_dirs, tmp_path):
    model_dir, text = tiny_dirs
    train_main(["--model", str(model_dir), "--text", str(text), "--out", str(tmp_path / "one"), "--batch-size", "4",
                *ARGS])
    _torchrun(model_dir, text, tmp_path / "two")
    one, two = _gates(tmp_path / "one"), _gates(tmp_path / "two")
    start, _ = load_model(parse_args(["--model", str(model_dir), "--text", str(text), "--out", str(tmp_path)]))
    moved = {k: (v - one[k]).abs().max().item() for k, v in gate_state_dict(start).items()}
    assert min(moved.values()) > 1e-4, moved  # every gate tensor trained: the match is not two untouched inits
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 5
    single = json.loads((tmp_path / "one" / "report.json").read_text())
    assert [h["loss"] for h in report["history"]] == pytest.approx([h["loss"] for h in single["history"]], rel=1e-4)
    # Stopped after 3 steps (process 0 checkpoints) and resumed: the same gates as the straight 2-process run.
    _torchrun(model_dir, text, tmp_path / "resumed", "--stop-after", "3", "--save-every", "3")
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-3"]
    _torchrun(model_dir, text, tmp_path / "resumed", "--resume")
    resumed = _gates(tmp_path / "resumed")
    for name in two:
        torch.testing.assert_close(resumed[name], two[name], rtol=0, atol=0, msg=name)
