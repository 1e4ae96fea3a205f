"""Rows, the printed table and the environment header of the benchmarks."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch


@dataclass
class Row:
    """One line of the table and of the JSON file. Times in µs, bandwidths in GB/s (1e9 B/s)."""

    section: str
    op: str
    shape: str
    dtype: str
    device: str
    op_us: float
    ref_us: float
    speedup: float  # ref_us / op_us
    bytes: int  # bytes read + written by the op under its case's bytes model
    gbps: float
    copy_gbps: float
    pct_copy: float
    check: str  # "ok" or what differed from the reference in the one-off check
    extra: Dict[str, object] = field(default_factory=dict)


COLUMNS: List[Tuple[str, int, Callable[[Row], str]]] = [  # (title, width, cell of a Row)
    ("op", 17, lambda r: r.op),
    ("shape", 26, lambda r: r.shape),
    ("dtype", 9, lambda r: r.dtype),
    ("op µs", 10, lambda r: f"{r.op_us:.1f}"),
    ("ref µs", 11, lambda r: f"{r.ref_us:.1f}"),
    ("speedup", 8, lambda r: f"{r.speedup:.1f}x"),
    ("GB/s", 8, lambda r: f"{r.gbps:.1f}"),
    ("copy GB/s", 10, lambda r: f"{r.copy_gbps:.1f}"),
    ("% copy", 7, lambda r: f"{r.pct_copy:.0f}%"),
    ("check", 0, lambda r: r.check),
]


def _line(cells: List[str]) -> str:
    # The first two columns (op, shape) are left-aligned, the numbers right-aligned.
    return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, (_, w, _)) in enumerate(zip(cells, COLUMNS)))


def print_table_head() -> None:
    line = _line([title for title, _, _ in COLUMNS])
    print(line)
    print("-" * len(line))


def print_row(row: Row) -> None:
    print(_line([cell(row) for _, _, cell in COLUMNS]), flush=True)


def environment(device: torch.device, flush_l2: bool) -> Dict[str, object]:
    """Versions, device, threads, load and the sync-check setting; printed and stored in the JSON file."""
    import attngate_ext

    cuda = device.type == "cuda"
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "attngate_ext": attngate_ext.__version__,
        "device": f"{device.type}: {torch.cuda.get_device_name(device) if cuda else cpu_name()}",
        "threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2),  # other busy processes skew CPU timings
        "sync_checks": "OFF (attngate_ext.sync_checks(False))" if cuda else "n/a on CPU (CPU ops always check)",
        "l2_flush": flush_l2 and cuda,
        "timing": "torch.cuda.Event" if cuda else "time.perf_counter",
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
