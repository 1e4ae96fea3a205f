"""examples/summarize_equal_memory.py: the equal-bytes table against H2O and the spread of the gates' per-head
retention, on small hand-written result files (not outputs of the code under test)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "summarize_equal_memory.py"


@pytest.fixture(scope="module")
def summarize():
    spec = importlib.util.spec_from_file_location("_examples_summarize_equal_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(policy: str, share: float, ppl: float, **extra) -> dict:
    return {"policy": policy, "mode": "in_context", "target_share": share, "perplexity": ppl,
            "eviction_ratio": 1 - share, "held_share": share, **extra}


@pytest.fixture()
def files(tmp_path):
    base = tmp_path / "validation-plays-val-1024-base.json"
    base.write_text(json.dumps({"results": [
        {"policy": "dense", "mode": "dense", "perplexity": 20.0, "eviction_ratio": 0.0, "held_share": 1.0},
        _record("h2o", 0.5, 22.0), _record("h2o", 0.25, 25.0)]}))
    # 10 heads in 2 layers: retention 0.05, 0.15, ..., 0.95
    retention = [[0.05 + 0.1 * i for i in range(5)], [0.55 + 0.1 * i for i in range(5)]]
    gates = tmp_path / "validation-plays-val-1024-ring.json"
    gates.write_text(json.dumps({"results": [
        _record("gate", 0.5, 21.0, retention_per_head=retention),
        _record("gate", 0.25, 27.5, reachable=False)]}))
    return base, gates


def test_gate_rows_are_compared_with_the_h2o_row_of_the_first_file(summarize, files):
    text = summarize.table(list(files))
    gate_line = next(line for line in text.splitlines() if line.startswith("| gates"))
    assert "plays-val-1024-ring" in gate_line
    assert "21.00 / 0.500 / 0.500 (-4.5% vs H2O)" in gate_line  # 21 / 22 - 1
    assert "27.50 / 0.750 / 0.250 (out of reach) (+10.0% vs H2O)" in gate_line  # 27.5 / 25 - 1
    assert "| dense | 20.00 | 20.00 |" in text


def test_head_spread_counts_the_heads_and_their_quantiles(summarize, files):
    text = summarize.head_spread(list(files))
    rows = [line for line in text.splitlines() if "plays-val-1024-ring" in line]
    assert len(rows) == 1  # the 0.25 record has no retention_per_head
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1:] == ["0.5", "10", "0.05", "0.15", "0.55", "0.95", "0.95", "1", "1"]


def test_help_and_a_missing_file_are_reported_by_argparse(files):
    shown = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "--heads" in shown.stdout
    missing = subprocess.run([sys.executable, str(SCRIPT), str(files[0].parent / "nope.json")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no such result file" in missing.stderr and "nope.json" in missing.stderr
