"""FreePageBound: what the host knows about a paged pool's free pages without reading the device.

The paged ops pop pages from a free stack that lives on the device. To grow the pool before an op could run out,
the host keeps a lower bound of the free pages: the count read back at the last synchronisation, minus what the
appends since could have taken (a head gains at most ``ceil(r / S)`` pages from ``r`` more rows). It reads
``free_count`` back only when that bound could run out.

The pool slack rule: a growth, a shrink or a repack leaves :meth:`FreePageBound.headroom_pages` free pages, an eighth
of the pages held plus one page per (batch row, head), so that a pool never holds more than ``held + held / 8 + one
page per (row, head)`` pages after any of them, and appends only use free pages up. The one page per (row, head) is a
decode step's worst case (every head starting a page), so a decode loop synchronises at most once every
``S * (1 + held / (8 * row_heads))`` steps: every ``S`` steps when the heads keep little, less often as they grow.
"""

from __future__ import annotations

from typing import Optional


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class FreePageBound:
    """The lower bound of one pool's free pages, for ``row_heads`` (batch row, head) sequences of ``page_size`` rows.

    Attributes:
        known: free pages at the last read-back (exact right after :meth:`synced`).
        rows_since: rows per head appended since then (an upper bound for every head).
        length: an upper bound of the longest head (sizes the page table).
    """

    def __init__(self, page_size: int, row_heads: int) -> None:
        self.page_size = page_size
        self.row_heads = row_heads
        self.known = 0
        self.rows_since = 0
        self.length = 0

    def pages_for_rows(self, rows: int) -> int:
        """Pages that ``rows`` more rows per head can take, at most."""
        return self.row_heads * ceil_div(rows, self.page_size)

    def may_run_out(self, rows: int) -> bool:
        """Whether appending ``rows`` more rows per head could need more pages than the bound guarantees."""
        return self.pages_for_rows(self.rows_since + rows) > self.known

    def synced(self, free: int) -> int:
        """Records an exact count of free pages (read back, or set by a growth or a repack); returns it."""
        self.known, self.rows_since = free, 0
        return free

    def headroom_pages(self, held: int) -> int:
        """Free pages a growth, shrink or repack leaves when ``held`` pages are held: ``held // 8 + row_heads``."""
        return held // 8 + self.row_heads

    def appended(self, rows: int, taken: Optional[int]) -> None:
        """Records that ``rows`` rows per head were appended; ``taken``: the pages counted exactly, if they were."""
        self.length += rows
        if taken is None:
            self.rows_since += rows
        else:  # counted exactly: the bound is exact again
            self.known -= taken
