"""Smoke test of the end-to-end benchmark section (benchmarks/e2e.py) and its run.py wiring; speed is never checked."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` run without the repository root on sys.path
    sys.path.insert(0, str(ROOT))

from benchmarks import config as bench_config  # noqa: E402
from benchmarks import run  # noqa: E402
from benchmarks.e2e import E2EConfig, run_e2e  # noqa: E402

MODES = ["dense", "gated@0", "gated@0.5", "gated@0.75"]


def _tiny(**overrides) -> E2EConfig:
    """2 layers, 4 query heads on 2 KV heads of dim 16 (GQA), batch 2: a few seconds for the four modes."""
    sizes = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=128, batch=2, prefill=128,
                 decode=8, gate_head_dim=4, prefill_chunk=48, warmup_prefill=16, warmup_decode=2, repeats=1)
    sizes.update(overrides)
    return E2EConfig(device=torch.device("cpu"), dtype=torch.float32, **sizes)


def test_e2e_rows_evictions_and_kv_bytes(capsys):
    cfg = _tiny()
    rows = run_e2e(cfg)
    table = capsys.readouterr().out
    assert [r.op for r in rows] == MODES
    assert all(r.section == "e2e" and r.check == "ok" for r in rows)
    for mode in MODES:
        assert any(line.startswith(mode + " ") for line in table.splitlines()), f"no table line for {mode}"
    extra = {r.op: r.extra for r in rows}

    # Dense: 2 (K, V) * layers * B * KV heads * tokens * head dim * 4 bytes, after the prompt and after decoding.
    head_dim = 64 // 4
    dense_bytes = lambda tokens: 2 * 2 * 2 * 2 * tokens * head_dim * 4  # noqa: E731
    assert extra["dense"]["kv_bytes_prefill"] == dense_bytes(128)
    assert extra["dense"]["kv_bytes_decode"] == dense_bytes(128 + 8)
    assert extra["dense"]["eviction"] == 0.0

    for asked in (0.0, 0.5, 0.75):
        e = extra[f"gated@{asked:g}"]
        assert abs(e["eviction"] - asked) <= 0.1, (asked, e["eviction"])
        assert e["dense_kv_bytes_decode"] == dense_bytes(128 + 8)
        assert 0 < e["gate_bytes"] < e["kv_bytes_decode"]
        # The K/V held follows the eviction: at most one partly filled 16-row page per (layer, row, head) and the
        # one-row window ring beyond the kept rows.
        slack = 2 * 2 * 2 * (15 + 1) * 2 * head_dim * 4
        assert e["kv_bytes_decode"] <= (1 - e["eviction"]) * dense_bytes(128 + 8) + slack
    gated = [extra[mode] for mode in MODES[1:]]
    for key in ("kv_bytes_prefill", "kv_bytes_decode"):
        sizes = [e[key] for e in gated]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3, (key, sizes)
    json.dumps([asdict(r) for r in rows])  # the rows go to the JSON file as they are


def test_run_py_flags_select_the_sections(tmp_path):
    out = tmp_path / "e2e.json"
    assert run.main(["--device", "cpu", "--quick", "--sections", "e2e", "--e2e-prefill", "64", "--e2e-batch", "2",
                     "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert [r["op"] for r in saved["rows"]] == MODES
    assert all(r["section"] == "e2e" for r in saved["rows"])
    config = saved["rows"][0]["extra"]["config"]
    assert (config["prefill"], config["batch"]) == (64, 2)

    parse = lambda *argv: bench_config.make_config(bench_config.parse_args(["--device", "cpu", *argv]))  # noqa: E731
    assert parse().sections == ["ops", "e2e", "memory"]  # no bandwidth section off CUDA
    cuda = bench_config.parse_args(["--device", "cuda"])
    assert bench_config._sections(cuda) == ["ops", "bandwidth", "e2e", "memory"]
    assert parse("--sections", "ops").sections == ["ops"]
    assert parse("--real").sections == ["ops", "e2e", "memory", "real"]
    assert parse("--sections", "real", "ops").sections == ["ops", "real"]
    with pytest.raises(SystemExit):
        parse("--sections", "nonsense")


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="decode must be >= 1"):
        _tiny(decode=0)
