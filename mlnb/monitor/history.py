"""The per-cell memory history: one ``CellRecord`` per monitored cell, shared by ``%vram history`` and the dashboard."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from ..redact import mask_text
from ..units import format_bytes
from .memory_monitor import MemoryReport

__all__ = ["CellRecord", "CellHistory", "cell_history", "source_line"]

_SOURCE_CHARS = 60


def source_line(raw: str) -> str:
    """What the history keeps of a cell's source: its first non-blank line, secrets masked (``os_token = "***"``),
    shortened to 60 characters. Masked first: a token cut in two would no longer look like one.

    Example:
        ```python
        >>> source_line('\nos_token = "hf_...')
        'os_token = "***"'
        ```
    """
    first = mask_text(next((line.strip() for line in raw.splitlines() if line.strip()), ""))
    return first[:_SOURCE_CHARS] + ("…" if len(first) > _SOURCE_CHARS else "")


@dataclass(frozen=True)
class CellRecord:
    """What one cell did to memory.

    Attributes:
        cell: the execution count (``In[n]``).
        source: the first line of the cell, secrets masked, shortened (:func:`source_line`).
        report: the cell's :class:`MemoryReport`.
        touched_gpu: the cell allocated, freed or reserved GPU memory.
        error: the exception type that ended the cell, if any.
        notes: what mlnb did after the cell (frames cleared, outputs pinning tensors...).
    """

    cell: int
    source: str
    report: MemoryReport
    touched_gpu: bool
    error: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def seconds(self) -> float:
        return self.report.seconds

    def row(self) -> tuple[str, ...]:
        r = self.report
        if r.gpu:
            start, peak, end = r.start_allocated, r.peak_allocated, r.end_allocated
        else:
            start, peak, end = r.host_rss_start, r.host_peak_rss, r.host_rss_end
        return (
            str(self.cell), f"{r.seconds:.2f}", format_bytes(start), format_bytes(peak), format_bytes(end),
            "when idle" if r.deferred else format_bytes(r.freed), self.error or "", self.source,
        )


class CellHistory:
    """A bounded, thread-safe list of :class:`CellRecord`; ``version`` changes whenever it does."""

    HEADER = ("cell", "s", "start", "peak", "end", "freed", "error", "source")

    def __init__(self, maxlen: int = 1000) -> None:
        self._records: deque[CellRecord] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.version = 0

    def append(self, record: CellRecord) -> None:
        with self._lock:
            self._records.append(record)
            self.version += 1

    def records(self, last: int | None = None) -> list[CellRecord]:
        with self._lock:
            items = list(self._records)
        return items[-last:] if last else items

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self.version += 1

    def __len__(self) -> int:
        return len(self._records)


cell_history = CellHistory()
