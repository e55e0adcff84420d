"""Where mlnb's own log lines go: to stderr, as Python shows a warning without logging set up, except for a thread
whose lines have a place of their own.

A notebook kernel sends whatever a background thread writes to stderr into the cell that is running at that moment.
The dashboard's Generate thread therefore routes its lines (the plan, an unload) to its panel with :func:`routed`.
Nothing is installed on import: :func:`install` adds the handler to the ``mlnb`` logger, once.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from typing import Callable

__all__ = ["install", "routed"]

_routes: dict[int, Callable[[str], None]] = {}
_lock = threading.Lock()


class _Handler(logging.Handler):
    """Warnings and above: a routed thread's to its sink; the others to stderr, as ``logging.lastResort`` would write
    them, and only while nothing else (the root logger's handlers) shows them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        sink = _routes.get(record.thread)
        try:
            if sink is not None:
                sink(record.getMessage())
            elif not logging.getLogger().handlers:
                sys.stderr.write(record.getMessage() + "\n")
        except Exception:
            self.handleError(record)


_handler = _Handler()


def install() -> None:
    """Add the handler to the ``mlnb`` logger (once)."""
    logger = logging.getLogger("mlnb")
    with _lock:
        if _handler not in logger.handlers:
            logger.addHandler(_handler)


@contextlib.contextmanager
def routed(sink: Callable[[str], None]):
    """Inside, the current thread's mlnb warnings go to ``sink(message)`` instead of stderr."""
    install()
    ident = threading.get_ident()
    _routes[ident] = sink
    try:
        yield
    finally:
        _routes.pop(ident, None)
