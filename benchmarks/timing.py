"""The one timer of the benchmarks, and the bandwidth they compare with.

* :func:`median_us`: one op, repeated. CUDA: ``torch.cuda.Event`` pairs around each repetition, on the current
  stream; before each repetition the optional ``setup`` (e.g. restoring ``lengths``) runs and the L2 cache is
  flushed, both *outside* the events. CPU: ``time.perf_counter`` around each repetition, ``setup`` outside.
* :func:`interleaved_us`: CPU, several functions alternating rep by rep (load changes hit them alike).
* :class:`Stopwatch`: a whole region (a prefill, a decode loop), synchronising the GPU around it.

Op timers return the median over the repetitions, in microseconds, after warm-up repetitions.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

# Bigger than the L2 of any current GPU (H100/H200: 50 MiB), so a zero-fill evicts the previous repetition's data.
_L2_FLUSH_BYTES = 256 * 1024 * 1024
_flush_buffers: Dict[torch.device, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    buf = _flush_buffers.get(device)
    if buf is None:
        buf = _flush_buffers[device] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    buf.zero_()


def median_us(
    fn: Callable[[], object],
    device: torch.device,
    reps: int,
    warmup: int,
    setup: Optional[Callable[[], object]] = None,
    flush_l2: bool = True,
) -> float:
    """Median time of ``fn()`` in microseconds over ``reps`` repetitions, after ``warmup`` untimed ones.

    ``setup()`` runs before every repetition (warm-up included) and is never timed: mutating ops use it to
    start each repetition from the same state. On CUDA the L2 cache is also flushed before each repetition
    (untimed) when ``flush_l2`` is set, so the numbers are DRAM numbers even when the working set fits in L2.
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    if device.type == "cuda":
        return _median_us_cuda(fn, device, reps, setup, flush_l2)
    return _median_us_cpu(fn, reps, setup)


def _median_us_cuda(
    fn: Callable[[], object],
    device: torch.device,
    reps: int,
    setup: Optional[Callable[[], object]],
    flush_l2: bool,
) -> float:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for start, end in zip(starts, ends):
        if setup is not None:
            setup()
        if flush_l2:
            _flush_l2(device)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))  # ms -> µs


def _median_us_cpu(fn: Callable[[], object], reps: int, setup: Optional[Callable[[], object]]) -> float:
    times: List[float] = []
    for _ in range(reps):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def interleaved_us(fns: List[Callable[[], object]], reps: int, warmup: int) -> List[Tuple[float, float]]:
    """CPU: ``(median, min)`` µs of each function, the functions alternating rep by rep. On cores shared with other
    processes a parallel region can lose whole scheduler slices, which the minima leave out."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e6)
    return [(statistics.median(ts), min(ts)) for ts in times]


class Stopwatch:
    """``with Stopwatch(device) as watch: ...`` then ``watch.seconds``: wall time of the block, the GPU synchronised
    before and after it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> "Stopwatch":
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._start


def gbps(nbytes: int, time_us: float) -> float:
    """Bytes moved per microsecond, as GB/s (1 GB = 1e9 bytes)."""
    return nbytes / time_us / 1e3 if time_us > 0 else float("nan")


class CopyBandwidth:
    """Measured ``dst.copy_(src)`` bandwidth on a device, cached by size.

    ``measure(nbytes)`` copies a buffer of ``nbytes / 2`` bytes, so that the copy, like the op it is compared
    with, reads plus writes ``nbytes`` in total; the result is that total over the median time, in GB/s.
    """

    def __init__(self, device: torch.device, reps: int, warmup: int) -> None:
        self.device = device
        self.reps = reps
        self.warmup = warmup
        self._cache: Dict[int, float] = {}

    def measure(self, nbytes: int) -> float:
        half = max(nbytes // 2, 16)
        half -= half % 16  # keep the copy 16-byte vectorisable
        if half not in self._cache:
            src = torch.empty(half, dtype=torch.uint8, device=self.device).fill_(1)
            dst = torch.empty_like(src)
            t = median_us(lambda: dst.copy_(src), self.device, self.reps, self.warmup)
            self._cache[half] = gbps(2 * half, t)
            del src, dst
        return self._cache[half]
