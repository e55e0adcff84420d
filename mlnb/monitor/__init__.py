"""Memory measurement: ``MemoryMonitor``, ``MemoryReport`` and the per-cell history."""

from .frames import clear_frames, function_frames, release_exception_frames
from .history import CellHistory, CellRecord, cell_history
from .memory_monitor import MemoryMonitor, MemoryReport, cleanup
from .tensor_walk import Skipped, TensorRef, find_device_tensors, find_tensors, frames_pinning, is_host_tensor

__all__ = ["MemoryMonitor", "MemoryReport", "cleanup", "CellRecord", "CellHistory", "cell_history", "clear_frames",
           "function_frames", "release_exception_frames",
           "Skipped", "TensorRef", "find_device_tensors", "find_tensors", "frames_pinning", "is_host_tensor"]
