"""Where mlnb's own log lines go: to stderr, as Python shows a warning without logging set up, except for a thread
whose lines have a place of their own.

A notebook kernel sends whatever a background thread writes to stderr into the cell that is running at that moment.
The dashboard's Generate thread therefore routes its lines (the plan, an unload, the libraries' notices while loading,
their ``warnings.warn`` calls) to its panel with :func:`routed`.
Nothing is installed on import: :func:`install` adds the handler to the ``mlnb`` logger, once; ``warnings.showwarning``
is wrapped only while a route is active.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import warnings
from typing import Callable

__all__ = ["install", "routed"]

_routes: dict[int, Callable[[str], None]] = {}
_warning_routes: dict[int, Callable[[str], None]] = {}
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


def _showwarning_over(previous):
    """A ``warnings.showwarning`` that sends a routed thread's warnings to its sink and hands every other to
    ``previous`` (Python calls it only for warnings that pass the filters)."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        sink = _warning_routes.get(threading.get_ident())
        if sink is None or file is not None:  # another thread's, or one asked for a file of its own
            return previous(message, category, filename, lineno, file, line)
        try:
            sink(f"{category.__name__}: {message}")
        except Exception:  # a failing sink must not turn a warning into an error: shown as without the route
            return previous(message, category, filename, lineno, file, line)

    showwarning._mlnb_previous = previous
    return showwarning


def _route_warnings(ident: int, sink: Callable[[str], None]) -> None:
    with _lock:
        _warning_routes[ident] = sink
        if not hasattr(warnings.showwarning, "_mlnb_previous"):  # ours is not the one Python calls: go over it
            warnings.showwarning = _showwarning_over(warnings.showwarning)


def _unroute_warnings(ident: int) -> None:
    with _lock:
        _warning_routes.pop(ident, None)
        shown = warnings.showwarning
        if not _warning_routes and hasattr(shown, "_mlnb_previous"):
            warnings.showwarning = shown._mlnb_previous
        # Replaced meanwhile (by the user, or a catch_warnings block still open): left as it is. Ours, if still in
        # its chain, hands everything on while no route is left.


@contextlib.contextmanager
def routed(sink: Callable[[str], None], libraries: Callable[[str], None] | None = None):
    """Inside, the current thread's mlnb warnings go to ``sink(message)`` instead of stderr, and what diffusers,
    transformers, huggingface_hub and accelerate log from it through their own handlers, and the Python warnings it
    raises (``"FutureWarning: message"``, after the warnings filters), to ``libraries`` (default: ``sink`` too)."""
    install()
    ident = threading.get_ident()
    _routes[ident] = sink
    keep = _thread_filter(ident, libraries or sink)
    handlers = [h for name in _LIBRARIES for h in logging.getLogger(name).handlers]
    for handler in handlers:
        handler.addFilter(keep)
    _route_warnings(ident, libraries or sink)
    try:
        yield
    finally:
        _unroute_warnings(ident)
        for handler in handlers:
            handler.removeFilter(keep)
        _routes.pop(ident, None)
