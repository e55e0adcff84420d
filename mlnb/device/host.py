"""Host memory facts: the machine's RAM and this process's resident set, through ``psutil`` and ``resource``.

Like every query of the device layer these never raise: a missing ``psutil`` or a failing call gives ``None`` (N/A).
All sizes are in bytes.
"""

from __future__ import annotations

import os
import sys

__all__ = ["host_memory", "host_rss", "host_peak_rss"]


def host_memory() -> tuple[int | None, int | None]:
    """Host RAM ``(total, available)`` in bytes, or ``(None, None)``."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except Exception:  # psutil missing or failing: NA, never raise
        return None, None


_process = None  # psutil's handle on this process, made once: making one reads /proc for its start time


def host_rss() -> int | None:
    """This process's resident set size in bytes."""
    global _process
    try:
        import psutil

        if _process is None or _process.pid != os.getpid():  # a forked child reads its own
            _process = psutil.Process()
        return int(_process.memory_info().rss)
    except Exception:
        return None


def host_peak_rss() -> int | None:
    """The process's lifetime peak RSS in bytes (``ru_maxrss``), or ``None``."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB
    except Exception:
        return None
