"""Memory measurement: ``MemoryMonitor``, ``MemoryReport`` and the per-cell history."""

from .frames import clear_frames, function_frames, release_exception_frames
from .history import CellHistory, CellRecord, cell_history
from .memory_monitor import MemoryMonitor, MemoryReport, cleanup

__all__ = ["MemoryMonitor", "MemoryReport", "cleanup", "CellRecord", "CellHistory", "cell_history", "clear_frames", "function_frames", "release_exception_frames"]
