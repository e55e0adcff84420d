"""Where mlnb's own log lines go: to stderr, as Python shows a warning without logging set up, except for a thread
whose lines have a place of their own.

A notebook kernel sends whatever a background thread writes to stderr into the cell that is running at that moment.
The dashboard's Generate thread therefore routes its lines (the plan, an unload, the libraries' notices while loading)
to its panel with :func:`routed`.
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


# Libraries that load and run the models, each with a handler of its own on its top logger (writing to stderr).
_LIBRARIES = ("diffusers", "transformers", "huggingface_hub", "accelerate")


def _thread_filter(ident: int, sink: Callable[[str], None]):
    """A handler filter that sends the thread ``ident``'s records to ``sink`` instead of the handler's stream."""

    def keep(record: logging.LogRecord) -> bool:
        if record.thread != ident:
            return True
        if not getattr(record, "_mlnb_routed", False):  # a logger with several handlers: sent once
            record._mlnb_routed = True
            try:
                sink(record.getMessage())
            except Exception:  # a sink that fails must not take the library's logging down
                pass
        return False

    return keep


@contextlib.contextmanager
def routed(sink: Callable[[str], None], libraries: Callable[[str], None] | None = None):
    """Inside, the current thread's mlnb warnings go to ``sink(message)`` instead of stderr, and what diffusers,
    transformers, huggingface_hub and accelerate log from it through their own handlers to ``libraries`` (default:
    ``sink`` too)."""
    install()
    ident = threading.get_ident()
    _routes[ident] = sink
    keep = _thread_filter(ident, libraries or sink)
    handlers = [h for name in _LIBRARIES for h in logging.getLogger(name).handlers]
    for handler in handlers:
        handler.addFilter(keep)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(keep)
        _routes.pop(ident, None)
