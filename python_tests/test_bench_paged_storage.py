"""Smoke test of the paged storage benchmark section (benchmarks/paged_storage.py); speed is never checked."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` run without the repository root on sys.path
    sys.path.insert(0, str(ROOT))

from benchmarks import config  # noqa: E402
from benchmarks.paged_storage import paged_storage_section  # noqa: E402


def test_section_rows_match_their_references(capsys):
    cfg = config.make_config(config.parse_args(["--device", "cpu", "--quick", "--reps", "1", "--warmup", "0"]))
    rows = paged_storage_section(cfg)
    table = capsys.readouterr().out
    assert [r.op for r in rows] == ["paged_append_kv_", "paged_append_kv_ decode", "paged_compact_kv_",
                                    "paged_remove_rows_"]
    assert all(r.check == "ok" and r.section == "paged" for r in rows), [r.check for r in rows]
    assert all(r.bytes > 0 and r.op_us > 0 and r.extra["rect_us"] > 0 for r in rows)
    assert [r.extra["rect_op"] for r in rows] == ["append_kv_", "append_kv_", "compact_kv_", "compact_kv_"]
    assert sum(line.startswith("paged_") for line in table.splitlines()) == 4
