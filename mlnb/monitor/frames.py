"""Releasing what a traceback's frames hold, so an error does not pin GPU memory until the next error."""

from __future__ import annotations

from typing import Callable

__all__ = ["function_frames", "clear_frames", "release_exception_frames"]


def function_frames(tb):
    """The frames of a traceback, skipping module-level frames (their locals are a namespace, not the error's)."""
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_locals is not frame.f_globals:
            yield frame
        tb = tb.tb_next


def clear_frames(tb, pins: Callable[[object], bool] | None = None) -> int:
    """Clear the locals of a traceback's finished function frames; returns how many were cleared.

    Args:
        tb: the traceback.
        pins: which frames to clear (``pins(frame)``); every finished frame when None. The others keep their
            locals for ``%debug``.
    """
    count = 0
    for frame in function_frames(tb):
        if pins is not None and not pins(frame):
            continue
        try:
            frame.clear()
        except RuntimeError:  # a frame still executing cannot be cleared
            continue
        # Before Python 3.13, a frame whose f_locals was read keeps that dict snapshot (and its objects) after
        # clear(); reading f_locals again re-syncs the snapshot with the now-empty frame.
        frame.f_locals
        count += 1
    return count


def release_exception_frames(exc: BaseException | None, pins: Callable[[object], bool] | None = None) -> int:
    """:func:`clear_frames` for an exception and every exception chained to it; returns frames cleared.

    Args:
        exc: the exception.
        pins: which frames to clear, as for :func:`clear_frames` (e.g. :func:`mlnb.monitor.frames_pinning`).
    """
    seen: set[int] = set()
    count = 0
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        count += clear_frames(exc.__traceback__, pins)
        exc = exc.__cause__ or exc.__context__
    return count
