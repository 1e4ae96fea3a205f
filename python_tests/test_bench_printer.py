"""The benchmarks' printer: tables line up, and torch.profiler's C++ log lines stay out of the output (the memory
section profiles the CPU allocator)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` run without the repository root on sys.path
    sys.path.insert(0, str(ROOT))

from benchmarks.peak_memory import peak_bytes  # noqa: E402
from benchmarks.printer import PROFILER_NOISE, Row, Table, without_profiler_noise  # noqa: E402


def test_a_profiled_region_prints_no_profiler_noise(capfd):
    peak, result = peak_bytes(lambda: torch.ones(1 << 16).sum(), torch.device("cpu"))
    out, err = capfd.readouterr()
    assert peak >= 4 << 16 and float(result) == 1 << 16  # the profile really ran
    assert not any(noise in out + err for noise in PROFILER_NOISE), out + err
    assert "USDT" not in out + err


def test_other_error_output_still_passes(capfd):
    with without_profiler_noise():
        os.write(2, b"a real warning\nUSDT: profiler_start\n")
        print("to stderr from Python", file=sys.stderr)
    _, err = capfd.readouterr()
    assert "a real warning" in err and "to stderr from Python" in err and "profiler_start" not in err


def test_table_columns_line_up(capsys):
    table = Table([("op", 6, lambda r: r.op), ("µs", 8, lambda r: f"{r.op_us:.1f}")], left=1)
    table.print_head()
    table.print_row(Row("s", "x", "", "", "cpu", 12.25, 0.0, 0.0, 0, 0.0, 0.0, 0.0, "ok"))
    head, rule, row = capsys.readouterr().out.splitlines()
    assert head == "op            µs" and set(rule) == {"-"} and len(rule) == len(head) and row == "x           12.2"
