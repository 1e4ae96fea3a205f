"""FreePageBound: what the host knows about a paged pool's free pages without reading the device.

The paged ops pop pages from a free stack that lives on the device. To grow the pool before an op could run out,
the host keeps a lower bound of the free pages: the count read back at the last synchronisation, minus what the
appends since could have taken (a head gains at most ``ceil(r / S)`` pages from ``r`` more rows). It reads
``free_count`` back only when that bound could run out, and a growth leaves every head room for about an eighth of
its length more, so a decode loop synchronises once every that many steps at most.
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
        length: an upper bound of the longest head.
    """

    def __init__(self, page_size: int, row_heads: int, max_headroom: int) -> None:
        self.page_size = page_size
        self.row_heads = row_heads
        self.max_headroom = max_headroom
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

    def headroom_pages(self) -> int:
        """Free pages a growth or a shrink leaves: room for ``clamp(length / 8, S, max_headroom)`` rows per head."""
        S = self.page_size
        return self.pages_for_rows(min(max(self.length // 8, S), max(self.max_headroom, S)))

    def appended(self, rows: int, taken: Optional[int]) -> None:
        """Records that ``rows`` rows per head were appended; ``taken``: the pages counted exactly, if they were."""
        self.length += rows
        if taken is None:
            self.rows_since += rows
        else:  # counted exactly: the bound is exact again
            self.known -= taken
