"""The dashboard panel: live memory gauges, the per-cell history, the session controls and the Generate panel.

Building the widgets is kept apart from updating them: :meth:`Dashboard.refresh` computes a
:class:`~mlnb.widgets.state.GaugeState` and copies it into traits. A daemon thread calls it every ``interval``
seconds; it only sets traits and logs, and stops when the panel is closed (``close()``, ``Widget.close_all()``,
``mlnb.widgets.close_all()`` on ``%unload_ext mlnb``, or :func:`close_all` with ``keep`` when ``mlnb.dashboard()``
builds the next one).
"""

from __future__ import annotations

import html
import logging
import threading
import weakref

import ipywidgets as widgets

from ..levels import LEVEL_NAMES
from ..monitor.history import CellHistory, cell_history
from .generate_panel import GeneratePanel
from .plot import PLOT_SIZE, HistoryPlot
from .state import GaugeState, gauge_state, history_table_html, one_line

logger = logging.getLogger(__name__)

__all__ = ["Dashboard", "live_dashboards", "open_dashboards", "close_all"]

_live: "weakref.WeakSet[Dashboard]" = weakref.WeakSet()  # updater running
_open: weakref.WeakSet[Dashboard] = weakref.WeakSet()  # built and not closed, updating or not
_live_lock = threading.Lock()


def live_dashboards() -> list["Dashboard"]:
    """The dashboards whose updater is running."""
    with _live_lock:
        return list(_live)


def open_dashboards() -> list[Dashboard]:
    """The dashboards built and not closed (a superset of :func:`live_dashboards`)."""
    with _live_lock:
        return list(_open | _live)


def close_all(keep: Dashboard | None = None) -> int:
    """Close every open dashboard but ``keep`` (stops their threads). Returns how many were closed.

    Example:
        ```python
        >>> from mlnb.widgets.panel import close_all
        >>> close_all()
        0
        ```
    """
    boards = [board for board in open_dashboards() if board is not keep]
    for board in boards:
        board.close()
    return len(boards)


def _section(title: str) -> widgets.HTML:
    return widgets.HTML(value=f"<b>{html.escape(title)}</b>")


class _GaugeRow(widgets.HBox):
    """A label, a bar and the figures; ``show`` copies one :class:`~mlnb.widgets.state.Gauge` in."""

    def __init__(self) -> None:
        # A Layout is a widget with its own comm: each row gets fresh ones, never a shared module-level instance
        # (Widget.close_all() would close it under later dashboards).
        self.label = widgets.HTML(value="", layout=widgets.Layout(width="230px"))
        self.bar = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, layout=widgets.Layout(width="260px"))
        self.figures = widgets.HTML(value="")
        super().__init__(children=[self.label, self.bar, self.figures])

    def show(self, gauge) -> None:
        self.label.value = html.escape(gauge.label)
        self.bar.value = gauge.fraction
        self.bar.bar_style = gauge.bar_style
        self.figures.value = html.escape(gauge.text)


class Dashboard(widgets.VBox):
    """One panel over the session: gauges, history, controls and Generate. Create it with :func:`mlnb.dashboard`.

    Args:
        interval: seconds between gauge updates.
        device: the device to watch; the current device (``mlnb.device.get_device()``) at each update when None.
        history: the cell history to plot (``mlnb.monitor.cell_history``).
        start: start the updater thread (tests drive :meth:`refresh` by hand with ``start=False``).

    Example:
        ```python
        >>> import mlnb
        >>> board = mlnb.dashboard()
        >>> board  # the panel shows; board.close() stops its updates
        ```
    """

    def __init__(self, interval: float = 1.0, device=None, history: CellHistory | None = None, start: bool = True) -> None:
        from ..session import defaults

        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0.01 <= interval < float("inf"):
            raise ValueError(f"interval must be a number of seconds of at least 0.01, got {interval!r}")
        self.interval = interval
        self.device = device
        self.history = history if history is not None else cell_history
        self.state: GaugeState | None = None
        self._plot = HistoryPlot(self.history)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._synced = (None, None)  # (setting, model) last copied from the session defaults
        self._following = False  # True while the controls are set from the session defaults

        # -- memory
        self.headline = widgets.HTML(value="")
        self.gauge_rows = [_GaugeRow() for _ in range(3)]
        self.level_info = widgets.HTML(value="")
        # -- history
        self.plot = widgets.Image(value=b"", format="png", layout=widgets.Layout(width=f"{PLOT_SIZE[0]}px", display="none"))
        self.table = widgets.HTML(value="")
        # -- controls
        # A level from the list, or a VRAM budget typed in (4GiB), as `%vram level` takes; set on Enter.
        self.level = widgets.Combobox(options=list(LEVEL_NAMES), value=str(defaults.setting), description="level",
                                      placeholder="auto, a level, or 4GiB", ensure_option=False,
                                      continuous_update=False, layout=widgets.Layout(width="220px"))
        self.model = widgets.Text(value=defaults.model or "", placeholder="hub id or local folder",
                                  description="model", continuous_update=False, layout=widgets.Layout(width="420px"))
        self.free_button = widgets.Button(description="Free memory")
        self.free_result = widgets.HTML(value="")
        self.control_error = widgets.HTML(value="")
        # -- generate
        self.generate_panel = GeneratePanel(also_disable=[self.free_button])

        self.headline.add_class("mlnb-headline")
        self.plot.add_class("mlnb-history-plot")
        self.free_result.add_class("mlnb-free-result")
        super().__init__(children=[
            self.headline, _section("Memory"), *self.gauge_rows, self.level_info,
            _section("Controls"), widgets.HBox([self.level, self.model]),
            widgets.HBox([self.free_button, self.free_result]), self.control_error,
            _section("Cell history"), self.plot, self.table,
            _section("Generate"), self.generate_panel,
        ])
        self.add_class("mlnb-dashboard")
        with _live_lock:
            _open.add(self)

        self.level.observe(self._on_level, names="value")
        self.model.observe(self._on_model, names="value")
        self.free_button.on_click(self._on_free)
        self.refresh()
        if start:
            self.start()

    # -- updating -----------------------------------------------------------------------------------------------

    def refresh(self) -> GaugeState:
        """Recompute the gauges (and the history when it changed) and copy them into the widgets."""
        from ..device import get_device
        from ..session import defaults

        with self._lock:
            info = (self.device or get_device()).info()
            state = gauge_state(info, defaults.setting, _loaded_pipelines(), _active_loras())
            self.state = state
            self.headline.value = f"<b>mlnb</b> · {html.escape(state.headline)}"
            for row, gauge in zip(self.gauge_rows, state.gauges):
                row.show(gauge)
            self.level_info.value = (f"level: {html.escape(state.level)} · loaded: {html.escape(state.loaded)}"
                                     f"<br>LoRAs: {html.escape(state.loras)}")
            self._sync_controls(defaults)
            changed, records, png = self._plot.render()
            if changed:
                self.table.value = history_table_html(records)
                if png is not None:
                    self.plot.value = png
                self.plot.layout.display = None if png is not None else "none"
        return state

    def _sync_controls(self, defaults) -> None:
        # %vram level / %%generate --model change the defaults too; follow them without undoing the user's typing.
        setting, model = defaults.setting, defaults.model
        if (setting, model) == self._synced:
            return
        if setting != self._synced[0] and self.level.value != str(setting):
            self._following = True  # the session's default shown (4GiB as 4 GiB): not a choice to hand back
            try:
                self.level.value = str(setting)
            finally:
                self._following = False
        if model != self._synced[1] and (self.model.value or None) != model:
            self.model.value = model or ""
        self._synced = (setting, model)

    def start(self) -> None:
        """Start the updater thread (once)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._update_loop, name="mlnb-dashboard", daemon=True)
        self._thread.start()
        with _live_lock:
            _live.add(self)

    @property
    def running(self) -> bool:
        """The updater thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _update_loop(self) -> None:
        failures = 0
        while not self._stop.wait(self.interval):
            if self.comm is None:  # closed by Widget.close_all() or the frontend
                break
            try:
                self.refresh()
                failures = 0
            except Exception:
                failures += 1
                logger.debug("dashboard refresh failed", exc_info=True)
                if failures >= 10:
                    logger.warning("dashboard updates stopped after %d failures in a row", failures)
                    break
        with _live_lock:
            _live.discard(self)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the updater thread and wait for it."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with _live_lock:
            _live.discard(self)

    def close(self) -> None:
        """Stop the updates and close the panel and all its widgets."""
        if not hasattr(self, "_stop"):  # its __init__ refused its arguments: nothing was started or built
            return
        self.stop()
        with _live_lock:
            _open.discard(self)
        for child in self.children:
            _close_tree(child)
        if isinstance(getattr(self, "layout", None), widgets.Widget):
            self.layout.close()
        super().close()

    # -- controls -----------------------------------------------------------------------------------------------

    def _on_level(self, change) -> None:
        from ..session import defaults
        from ..setting import MemorySetting

        if self._following:
            return
        try:
            defaults.setting = MemorySetting.parse(change["new"])  # a level, or a budget typed in, as %vram level
            self.control_error.value = ""
        except ValueError as exc:
            self.control_error.value = f"<span style='color:#b00'>{html.escape(one_line(exc))}</span>"

    def _on_model(self, change) -> None:
        from ..session import defaults

        defaults.model = (change["new"] or "").strip() or None

    def _on_free(self, _button=None) -> None:
        """The Free memory button: unload every pipeline and clean up, then show the one-line report."""
        from ..session import free_memory

        if self.generate_panel.running:
            return
        try:
            report = free_memory(self.device)
            self.free_result.value = f"<code>{html.escape(str(report))}</code>"
        except Exception as exc:
            logger.debug("free_memory failed", exc_info=True)
            self.free_result.value = f"<span style='color:#b00'>{html.escape(one_line(exc))}</span>"
        self.refresh()


def _cached() -> list:
    import sys

    # Only ask the pipeline cache when it exists: a session that never loaded a model has none to list.
    if "mlnb.pipeline.cache" not in sys.modules:
        return []
    from ..pipeline import cached_pipelines

    return cached_pipelines()


def _loaded_pipelines() -> list[tuple[str, str]]:
    return [(m.model, m.level.value) for m in _cached()]


def _active_loras() -> list[tuple[str, float, int]]:
    return [(a.spec.source, a.spec.scale, a.nbytes) for m in _cached() for a in m.loras]


def _close_tree(widget) -> None:
    """Close a widget, its children, and their layouts and styles (each a model of its own in the kernel and in the
    saved notebook's widget state)."""
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    for part in ("layout", "style"):
        model = getattr(widget, part, None)
        if isinstance(model, widgets.Widget):
            model.close()
    widget.close()
