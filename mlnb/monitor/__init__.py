"""Memory measurement: ``MemoryMonitor``, ``MemoryReport`` and the per-cell history."""

from .history import CellHistory, CellRecord, cell_history
from .memory_monitor import MemoryMonitor, MemoryReport, cleanup

__all__ = ["MemoryMonitor", "MemoryReport", "cleanup", "CellRecord", "CellHistory", "cell_history"]
