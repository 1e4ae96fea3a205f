"""The one printer of the benchmarks: the rows every section returns, the tables they print, and the header.

Each section declares its table as a list of columns ``(title, width, cell)``, ``cell`` turning a :class:`Row` into
text; :class:`Table` prints its head and its rows, the first ``left`` columns left-aligned, the numbers right-aligned.
:func:`without_profiler_noise` keeps the log lines of ``torch.profiler``'s C++ side out of the tables.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

# What torch.profiler's C++ side writes to stderr around a profile on the CPU: kineto's USDT markers
# ("USDT:... profiler_start" / "profiler_stop") and the allocator's note on blocks allocated before it started.
PROFILER_NOISE = ("profiler_start", "profiler_stop", "allocated before the profiling started")

import torch

Column = Tuple[str, int, Callable[["Row"], str]]  # (title, width, cell of a Row)


@dataclass
class Row:
    """One line of a table and of the JSON file. Times in µs, bandwidths in GB/s (1e9 B/s)."""

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


def timed_columns(op_width: int, shape_width: int) -> List[Column]:
    """The first columns of an op table: op, shape, dtype, op µs, reference µs and speedup (reference / op)."""
    return [("op", op_width, lambda r: r.op), ("shape", shape_width, lambda r: r.shape),
            ("dtype", 9, lambda r: r.dtype), ("op µs", 10, lambda r: f"{r.op_us:.1f}"), ("ref µs", 11, lambda r: f"{r.ref_us:.1f}"),
            ("speedup", 8, lambda r: f"{r.speedup:.1f}x")]


def bandwidth_columns() -> List[Column]:
    """The last columns of an op table: achieved GB/s, a copy's GB/s for as many bytes, and their ratio; the check."""
    return [("GB/s", 8, lambda r: f"{r.gbps:.1f}"), ("copy GB/s", 10, lambda r: f"{r.copy_gbps:.1f}"),
            ("% copy", 7, lambda r: f"{r.pct_copy:.0f}%"), ("check", 0, lambda r: r.check)]


class Table:
    """A table of :class:`Row` objects: ``print_head()`` once, then ``print_row(row)`` as rows come."""

    def __init__(self, columns: Sequence[Column], left: int = 2) -> None:
        self.columns = list(columns)
        self.left = left

    def _line(self, cells: List[str]) -> str:
        return "  ".join(c.ljust(w) if i < self.left else c.rjust(w)
                         for i, (c, (_, w, _)) in enumerate(zip(cells, self.columns)))

    def print_head(self) -> None:
        line = self._line([title for title, _, _ in self.columns])
        print(line)
        print("-" * len(line))

    def print_row(self, row: Row) -> None:
        print(self._line([cell(row) for _, _, cell in self.columns]), flush=True)


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


def print_header(head: Dict[str, object], reps: int, warmup: int, ref_reps: int, ref_warmup: int) -> None:
    """The lines above the tables: versions, device, load, and how times are taken."""
    print(f"attngate_ext {head['attngate_ext']} benchmarks | torch {head['torch']} (CUDA {head['cuda']}) | "
          f"{head['device']} | threads {head['threads']} (load avg {head['load_avg_1min']}) | "
          f"sync checks {head['sync_checks']}")
    print(f"timing: median of {reps} reps after {warmup} warm-up ({ref_reps}/{ref_warmup} for references), "
          f"{head['timing']}" + (", L2 flushed before each rep" if head["l2_flush"] else ""))


@contextlib.contextmanager
def without_profiler_noise() -> Iterator[None]:
    """Within the block, stderr (the file descriptor, which C++ writes to) goes to a temporary file; afterwards its
    lines are written back to stderr, but for those of :data:`PROFILER_NOISE`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines(keepends=True):
                if not any(noise in line for noise in PROFILER_NOISE):
                    sys.stderr.write(line)
            sys.stderr.flush()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
