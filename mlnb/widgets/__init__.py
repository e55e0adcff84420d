"""The ipywidgets dashboard: ``mlnb.dashboard()``.

ipywidgets is optional. mlnb works without it; the import is tried once, when a dashboard is first asked for, and
only :func:`dashboard` then raises an ImportError that says what to install. :func:`close_all` works either way
(``%unload_ext mlnb`` calls it to stop every dashboard's updater thread).

The modules: ``state`` (what the gauges and the table show, pure), ``plot`` (the per-cell peak chart as PNG),
``generate_panel`` (the Generate form and its worker thread) and ``panel`` (the :class:`Dashboard` itself).
"""

from __future__ import annotations

import sys

__all__ = ["dashboard", "close_all", "require_ipywidgets", "INSTALL_HINT"]

INSTALL_HINT = 'the mlnb dashboard needs ipywidgets: pip install "mlnb[widgets]" (or pip install ipywidgets)'

_UNTRIED = object()
_ipywidgets = _UNTRIED  # the module, None when missing, _UNTRIED before the first try


def require_ipywidgets():
    """Import ipywidgets (tried once per process) or raise an ImportError naming the install command."""
    global _ipywidgets
    if _ipywidgets is _UNTRIED:
        try:
            import ipywidgets
        except ImportError:
            ipywidgets = None
        _ipywidgets = ipywidgets
    if _ipywidgets is None:
        raise ImportError(INSTALL_HINT)
    return _ipywidgets


def dashboard(interval: float = 1.0, **kwargs):
    """The live dashboard: memory gauges, per-cell history, level/model controls, Free memory and Generate.

    Works on ipywidgets 7.7.1 (Colab) and 8.x. The gauges update every ``interval`` seconds from a background thread
    until the panel is closed. Without a GPU the VRAM gauges say so.

    One dashboard at a time: once the new panel is built, the ones ``dashboard()`` made before are closed, so
    re-running the cell does not leave the old board polling the GPU. A generation the old board started finishes
    in the background; its result is ``mlnb.last_result()``.

    Args:
        interval: seconds between gauge updates.
        **kwargs: passed to :class:`mlnb.widgets.panel.Dashboard` (``device``, ``history``, ``start``).

    Returns:
        The panel, an ``ipywidgets.VBox``; display it as a cell's last expression. ``.close()`` stops it.

    Raises:
        ImportError: ipywidgets is not installed; the message names ``pip install "mlnb[widgets]"``.

    Example:
        ```python
        >>> import mlnb
        >>> from mlnb.session import defaults
        >>> defaults.model = "stabilityai/stable-diffusion-xl-base-1.0"
        >>> mlnb.dashboard()
        ```
    """
    require_ipywidgets()
    from . import panel

    unknown = sorted(set(kwargs) - {"device", "history", "start"})
    if unknown:  # before any widget is made: a half-built panel prints noise when it is collected
        raise TypeError(f"dashboard() got an unexpected keyword argument {unknown[0]!r}")
    board = panel.Dashboard(interval=interval, **kwargs)  # built first: a refused call leaves the open board as is
    panel.close_all(keep=board)
    return board


def close_all() -> int:
    """Close every open dashboard and stop its updater thread; returns how many were closed.

    Safe without ipywidgets and when no dashboard was ever built.

    Example:
        ```python
        >>> import mlnb.widgets
        >>> board = mlnb.widgets.dashboard()
        >>> mlnb.widgets.close_all()
        1
        ```
    """
    panel = sys.modules.get(f"{__name__}.panel")
    if panel is None:
        return 0
    return panel.close_all()
