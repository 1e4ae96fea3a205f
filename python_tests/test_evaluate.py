"""python -m attngate_ext.evaluate on a tiny model: deterministic, the dense number checked independently."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attngate_ext.evaluate import main as evaluate_main
from attngate_ext.evaluation.perplexity import token_windows

from helpers.gated import save_tiny_gated_model
from helpers.models import make_tokenizer

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(120))


@pytest.fixture
def setup(tmp_path):
    model_dir, gates_dir = save_tiny_gated_model(tmp_path, "mistral", protect_recent=2)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"context": f"Line {i}: the quick brown", "choices": [" fox", " cat", " dog"],
                                      "label": 0}) + "\n" for i in range(3)))
    return model_dir, gates_dir, text, mc


def _run(setup, out, *extra):
    model_dir, gates_dir, text, mc = setup
    evaluate_main(["--model", str(model_dir), "--gates", str(gates_dir), "--text", str(text), "--mc", str(mc),
                   "--ratios", "0.5", "--context-len", "32", "--continuation-len", "32", "--windows", "4",
                   "--batch-size", "2", "--page-size", "1", "--no-progress", "--out", str(out), *extra])
    return json.loads(out.read_text())


def test_evaluate_is_deterministic_and_measures_what_it_promises(setup, tmp_path):
    first = _run(setup, tmp_path / "a.json")
    second = _run(setup, tmp_path / "b.json")
    assert first == second
    rows = {(r["policy"], r["mode"]): r for r in first["results"]}
    expected = {("dense", "dense"), ("gate", "in_context")} | {
        (p, m) for p in ("window", "streaming_llm", "random", "h2o", "snapkv") for m in ("in_context", "post_prefill")
    }
    assert set(rows) == expected
    for (policy, mode), r in rows.items():
        assert r["perplexity"] > 1 and 0 <= r["accuracy"] <= 1
        if mode == "post_prefill" or policy in ("h2o", "snapkv", "window", "streaming_llm"):
            assert r["eviction_ratio"] == pytest.approx(0.5)  # exactly the budget
            assert r["kv_share"] <= 0.5 + 0.05  # + the window ring's one dead row per head
    assert abs(rows[("gate", "in_context")]["eviction_ratio"] - 0.5) < 0.15  # calibrated on the same text
    # The dense number, computed independently with the plain model.
    model_dir = setup[0]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    windows = token_windows(make_tokenizer()(TEXT)["input_ids"], 64, 4, spread=True)  # evaluate spreads its windows
    with torch.no_grad():
        logits = model(windows).logits[:, 31:63]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 32:].flatten())
    assert rows[("dense", "dense")]["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_evaluate_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_main(["--model", "x", "--out", str(tmp_path / "o.json")])
    assert "--text" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main(["--model", "x", "--text", "t", "--ratios", "1.5"])
    assert "--ratios" in capsys.readouterr().err


def test_evaluate_writes_the_plots(setup, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (scripts/bootstrap.sh installs it)")
    from matplotlib.image import imread

    out = _run(setup, tmp_path / "p.json", "--policies", "gate", "streaming_llm", "--plots", str(tmp_path / "plots"))
    assert len(out["plots"]) == 3
    for path in out["plots"]:
        assert imread(path).std() > 0.01, path
