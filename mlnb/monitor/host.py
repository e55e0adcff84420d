"""Giving freed host memory back to the operating system.

When weights move from host RAM to the GPU, glibc's allocator keeps much of the freed memory in its heap, so the
process's resident size stays as large as if the weights were still there. Pinned copies made afterwards for
streaming then add to it. ``malloc_trim(0)`` returns the free pages; elsewhere (macOS, musl, Windows) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

__all__ = ["trim_host_heap"]

_libc = None


def trim_host_heap() -> bool:
    """Return free heap memory to the OS (glibc only). True when it ran."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = _libc.malloc_trim
    except (OSError, AttributeError) as exc:  # not glibc (musl has no malloc_trim)
        logger.debug("malloc_trim is not available: %s", exc)
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
