"""Memory measurement: ``MemoryMonitor`` and ``MemoryReport``."""

from .memory_monitor import MemoryMonitor, MemoryReport, cleanup

__all__ = ["MemoryMonitor", "MemoryReport", "cleanup"]
