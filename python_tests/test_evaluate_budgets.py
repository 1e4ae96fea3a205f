"""python -m attngate_ext.evaluate --budgets: every policy at the same held-byte share, deterministic, with the
eviction each needed, a markdown table and the quality-vs-bytes plot."""

from __future__ import annotations

import json

import pytest

from attngate_ext.evaluate import main as evaluate_main
from attngate_ext.evaluation.equal_bytes import budget_table, budget_tasks

from helpers.gated import save_tiny_gated_model

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(160))


@pytest.fixture
def setup(tmp_path):
    model_dir, gates_dir = save_tiny_gated_model(tmp_path, "llama", protect_recent=4, sink_tokens=2)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(TEXT[::-1])
    return model_dir, gates_dir, text, calibration


def _run(setup, out, *extra):
    model_dir, gates_dir, text, calibration = setup
    evaluate_main(["--model", str(model_dir), "--gates", str(gates_dir), "--text", str(text), "--calibration-text",
                   str(calibration), "--ratios", "--budgets", "0.6", "--policies", "gate", "streaming_llm", "h2o",
                   "snapkv", "--context-len", "96", "--continuation-len", "32", "--windows", "2",
                   "--calibration-windows", "2", "--batch-size", "2", "--page-size", "4", "--no-progress", "--out",
                   str(out), *extra])
    return json.loads(out.read_text())


def test_budgets_put_every_policy_at_the_same_held_bytes(setup, tmp_path, capsys):
    first = _run(setup, tmp_path / "a.json")
    assert _run(setup, tmp_path / "b.json") == first  # deterministic
    rows = {r["policy"]: r for r in first["results"]}
    assert set(rows) == {"dense", "gate", "streaming_llm", "h2o", "snapkv"}
    assert rows["dense"]["held_share"] == 1.0
    for policy in ("gate", "streaming_llm", "h2o", "snapkv"):
        r = rows[policy]
        assert r["target_share"] == 0.6 and r["mode"] == "in_context" and r["reachable"]
        assert r["calibration_share"] <= 0.6 + 0.003
        assert r["allocated_share"] >= r["held_share"]
        if policy == "gate":  # set on other text: the share measured on the evaluated windows differs somewhat
            assert abs(r["held_share"] - 0.6) < 0.1 and r["gate_share"] > 0
        else:  # baselines hold a fixed number of rows per head: the same share on any text of this length
            assert r["held_share"] == pytest.approx(r["calibration_share"], abs=1e-9)
            assert 0.6 - 0.05 < r["held_share"] <= 0.6 + 0.002 and r["gate_share"] == 0
        # The eviction each needed is reported; every byte of a baseline is a kept row or page rounding.
        assert 0.3 < r["eviction_ratio"] < 0.7
    out = capsys.readouterr().out
    assert "at equal held bytes" in out and "| h2o |" in out


def test_budget_plot(setup, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (scripts/bootstrap.sh installs it)")
    from matplotlib.image import imread

    out = _run(setup, tmp_path / "p.json", "--plots", str(tmp_path / "plots"))
    names = [p.rsplit("/", 1)[-1] for p in out["plots"]]
    assert "perplexity_vs_held_bytes.png" in names and "perplexity_vs_eviction.png" not in names
    for path in out["plots"]:
        assert imread(path).std() > 0.01, path


def test_budget_tasks_and_table():
    assert budget_tasks(["gate", "h2o"], [0.5, 0.25], has_gates=False) == [("h2o", 0.5), ("h2o", 0.25)]
    results = [{"policy": "dense", "perplexity": 10.0},
               {"policy": "gate", "target_share": 0.25, "perplexity": 12.0, "eviction_ratio": 0.8, "held_share": 0.3,
                "reachable": False},
               {"policy": "h2o", "target_share": 0.25, "perplexity": 11.0, "eviction_ratio": 0.75, "held_share": 0.25}]
    table = budget_table(results)
    assert "| gate | 12.00 / 0.800 / 0.300 (budget out of reach) |" in table
    assert "| h2o | 11.00 / 0.750 / 0.250 |" in table and "| dense | 10.00 / 0 / 1.00 |" in table


def test_budgets_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_main(["--model", "x", "--text", "t", "--budgets", "0"])
    assert "--budgets" in capsys.readouterr().err


def test_per_head_calibration_at_a_budget_evicts_the_same_in_every_head(setup, tmp_path):
    out = _run(setup, tmp_path / "h.json", "--policies", "gate", "--calibration", "per_head")
    gate = next(r for r in out["results"] if r["policy"] == "gate")
    assert abs(gate["calibration_share"] - 0.6) < 0.05 and abs(gate["held_share"] - 0.6) < 0.1


def test_gate_window_choices_pick_the_window_per_budget(setup, tmp_path):
    out = _run(setup, tmp_path / "w.json", "--policies", "gate", "--budgets", "0.6", "0.3", "--gate-window-choices",
               "2", "8", "16")
    windows = {r["target_share"]: r["protect_recent"] for r in out["results"] if r["policy"] == "gate"}
    assert windows == {0.6: 16, 0.3: 16}  # 128-token windows: 38 and 19 rows are half the budgets
    out = _run(setup, tmp_path / "v.json", "--policies", "gate", "--budgets", "0.6", "0.2", "--gate-window-choices",
               "2", "8", "32")
    windows = {r["target_share"]: r["protect_recent"] for r in out["results"] if r["policy"] == "gate"}
    assert windows == {0.6: 32, 0.2: 8}
