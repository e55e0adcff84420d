"""The per-cell timeline: a small bar chart of each cell's peak memory, drawn to PNG bytes.

Drawn with matplotlib's object API on an Agg canvas, never through ``pyplot``: the user's backend and figures are left
alone, and drawing from the dashboard's background thread touches no global figure state. Without matplotlib the
panel shows the table alone.
"""

from __future__ import annotations

import io
import logging
from typing import Sequence

from ..units import GiB, MiB
from .state import HistoryPoint

logger = logging.getLogger(__name__)

__all__ = ["history_png", "HistoryPlot", "PLOT_SIZE"]

PLOT_SIZE = (520, 170)  # pixels
_BAR = "#4c72b0"
_ERROR_BAR = "#c44e52"


def history_png(
    points: Sequence[HistoryPoint], width_px: int = PLOT_SIZE[0], height_px: int = PLOT_SIZE[1], last: int = 40
) -> bytes | None:
    """Draw the last ``last`` cells' peaks as a PNG (``None`` when matplotlib is missing or nothing is recorded).

    Bars are the peak of each cell (GPU allocated on a GPU, host RSS on the CPU); cells that raised are red.

    Args:
        points: from :func:`mlnb.widgets.state.history_points`.
        width_px, height_px: the image size in pixels.
        last: how many of the newest cells to draw.

    Example:
        ```python
        >>> from mlnb.monitor import cell_history
        >>> from mlnb.widgets.state import history_points
        >>> png = history_png(history_points(cell_history.records()))
        ```
    """
    points = [p for p in points[-last:] if p.peak is not None]
    if not points:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.debug("matplotlib is not installed; the history plot is off")
        return None

    gpu = any(p.gpu for p in points)
    largest = max(p.peak for p in points)  # type: ignore[type-var]
    unit, scale = ("GiB", GiB) if largest >= GiB else ("MiB", MiB)
    dpi = 100
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(points))
    ax.bar(
        xs, [p.peak / scale for p in points],  # type: ignore[operator]
        color=[_ERROR_BAR if p.error else _BAR for p in points], width=0.7,
    )
    ax.set_xticks(list(xs))
    ax.set_xticklabels([str(p.cell) for p in points], fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("cell", fontsize=8)
    ax.set_ylabel(f"peak {unit}", fontsize=8)
    ax.set_title("peak GPU memory allocated per cell" if gpu else "peak host RSS per cell (no GPU)", fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout(pad=0.4)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


class HistoryPlot:
    """Redraws the plot only when the history's ``version`` changed since the last call.

    Args:
        history: a :class:`~mlnb.monitor.history.CellHistory` (normally ``mlnb.monitor.cell_history``).

    Example:
        ```python
        >>> plot = HistoryPlot(cell_history)
        >>> changed, records, png = plot.render()  # drawn
        >>> plot.render()[0]  # nothing recorded since: not drawn again
        False
        ```
    """

    def __init__(self, history) -> None:
        self.history = history
        self._version: int | None = None
        self.draws = 0  # how many times the plot was drawn

    def changed(self) -> bool:
        return self.history.version != self._version

    def render(self) -> tuple[bool, list, bytes | None]:
        """``(changed, records, png)``; ``records`` and ``png`` are empty/``None`` when nothing changed."""
        from .state import history_points

        version = self.history.version
        if version == self._version:
            return False, [], None
        records = self.history.records()
        png = history_png(history_points(records))
        self._version = version
        self.draws += 1
        return True, records, png
