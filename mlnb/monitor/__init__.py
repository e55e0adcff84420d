"""Memory measurement: ``MemoryMonitor``, ``MemoryReport``, the per-cell history, and the deferred release that gives
GPU memory back once the kernel is idle (:mod:`.release`)."""

from .frames import clear_frames, function_frames, release_exception_frames
from .history import CellHistory, CellRecord, cell_history
from . import release
from .memory_monitor import MemoryMonitor, MemoryReport, cleanup
from .release import Release, add_idle_hook, last_release
from .tensor_walk import Skipped, TensorRef, find_device_tensors, find_tensors, frames_pinning, is_host_tensor

__all__ = ["MemoryMonitor", "MemoryReport", "cleanup", "release", "Release", "add_idle_hook", "last_release",
           "CellRecord", "CellHistory", "cell_history", "clear_frames", "function_frames", "release_exception_frames",
           "Skipped", "TensorRef", "find_device_tensors", "find_tensors", "frames_pinning", "is_host_tensor"]
