"""What the dashboard shows, computed from the core's facts without any widget.

The updater thread turns a :class:`~mlnb.device.DeviceInfo` into a :class:`GaugeState` and the cell history into an
HTML table; the panel only copies these values into widget traits. ``str(state)`` is the same state as text, so the
display and the tests read one source.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..device import DeviceInfo
from ..levels import describe_auto
from ..monitor.history import CellHistory, CellRecord
from ..setting import AUTO_SETTING, MemorySetting
from ..units import format_bytes

__all__ = [
    "Gauge",
    "GaugeState",
    "gauge_state",
    "HistoryPoint",
    "history_points",
    "history_table_html",
    "one_line",
]

# Above these fractions a gauge turns orange, then red.
WARN_FRACTION = 0.75
DANGER_FRACTION = 0.9


@dataclass(frozen=True)
class Gauge:
    """One memory gauge: ``used`` of ``total`` bytes, or N/A with the reason in ``note``.

    Attributes:
        label: what is measured, e.g. ``"VRAM used (NVML, device-wide)"``.
        used: bytes in use, ``None`` when unknown.
        total: bytes in all, ``None`` when unknown.
        note: why the value is N/A, or an extra fact shown after the figures.
    """

    label: str
    used: int | None
    total: int | None
    note: str = ""

    @property
    def available(self) -> bool:
        return self.used is not None and bool(self.total)

    @property
    def fraction(self) -> float:
        """``used / total`` clipped to [0, 1]; 0 when N/A."""
        if not self.available:
            return 0.0
        return min(1.0, max(0.0, self.used / self.total))  # type: ignore[operator]

    @property
    def bar_style(self) -> str:
        """The ipywidgets progress bar style: ``""``, ``"warning"`` or ``"danger"``."""
        if not self.available or self.fraction < WARN_FRACTION:
            return ""
        return "warning" if self.fraction < DANGER_FRACTION else "danger"

    @property
    def text(self) -> str:
        """``"1.2 GiB / 4.0 GiB (30%)"``, or ``"N/A (reason)"``."""
        if not self.available:
            return f"N/A ({self.note})" if self.note else "N/A"
        figures = f"{format_bytes(self.used)} / {format_bytes(self.total)} ({self.fraction:.0%})"
        return f"{figures} · {self.note}" if self.note else figures


@dataclass(frozen=True)
class GaugeState:
    """Everything the gauges show at one instant.

    Attributes:
        device: the device's name, e.g. ``"Tesla T4"`` or ``"CPU (no CUDA device)"``.
        gpu: a CUDA (or simulated) device is present.
        gauges: VRAM device-wide (NVML), VRAM reserved by torch, host RAM, in that order.
        level: the default level, and what ``auto`` would pick now from free VRAM.
        loaded: the loaded pipelines and their levels.
        loras: the active LoRAs of the loaded pipelines with their scales and bytes (``"none"`` when there are
            none).
    """

    device: str
    gpu: bool
    gauges: tuple[Gauge, ...]
    level: str
    loaded: str
    loras: str = "none"

    @property
    def headline(self) -> str:
        return self.device if self.gpu else f"no GPU: {self.device}; VRAM gauges are N/A"

    def lines(self) -> list[str]:
        width = max(len(g.label) for g in self.gauges)
        rows = [self.headline]
        rows += [f"{g.label:<{width}}  {g.text}" for g in self.gauges]
        rows += [f"level: {self.level}", f"loaded: {self.loaded}", f"LoRAs: {self.loras}"]
        return rows

    def __str__(self) -> str:
        return "\n".join(self.lines())


def gauge_state(info: DeviceInfo, default: MemorySetting = AUTO_SETTING,
                pipelines: Sequence[tuple[str, str]] = (),
                loras: Sequence[tuple[str, float, int]] = ()) -> GaugeState:
    """Compute the gauges from device facts (pure: no widgets, no torch).

    Args:
        info: the device facts, from ``get_device().info()``.
        default: the session's memory setting, ``mlnb.session.defaults.setting``.
        pipelines: ``(model, level)`` of each loaded pipeline.
        loras: ``(source, scale, bytes)`` of each active LoRA of the loaded pipelines.

    Example:
        ```python
        >>> from mlnb.testing import FakeDevice
        >>> print(gauge_state(FakeDevice(total=4 * 2**30).info()))
        ```
    """
    if info.available:
        if info.nvml_used_bytes is not None:
            nvml = Gauge("VRAM used (NVML, device-wide)", info.nvml_used_bytes, info.nvml_total_bytes or info.total_bytes)
        else:
            nvml = Gauge("VRAM used (NVML, device-wide)", None, None, info.nvml_error or "NVML unavailable")
        reserved = Gauge(
            "VRAM reserved by torch", info.reserved_bytes, info.total_bytes,
            f"allocated {format_bytes(info.allocated_bytes)}" if info.allocated_bytes is not None else "",
        )
    else:
        nvml = Gauge("VRAM used (NVML, device-wide)", None, None, "no GPU")
        reserved = Gauge("VRAM reserved by torch", None, None, "no GPU")
    host_used = None
    if info.host_total_bytes is not None and info.host_available_bytes is not None:
        host_used = info.host_total_bytes - info.host_available_bytes
    host = Gauge("host RAM used", host_used, info.host_total_bytes, "" if host_used is not None else "psutil unavailable")

    if default.is_auto:
        level = f"auto, now {describe_auto(info.free_bytes, info.kind == 'cuda')}"
    else:
        budget = " budget" if default.budget is not None else ""  # %vram level 4GiB
        level = f"{default}{budget} (set by the user)"
    loaded = ", ".join(f"{_short_model(model)} at {lvl}" for model, lvl in pipelines) or "none"
    active = ", ".join(
        f"{_short_model(source)}{'' if scale == 1 else f':{scale:g}'} ({format_bytes(nbytes)})"
        for source, scale, nbytes in loras
    ) or "none"
    return GaugeState(device=info.name, gpu=info.available, gauges=(nvml, reserved, host), level=level, loaded=loaded,
                      loras=active)


def _short_model(model: str) -> str:
    # Local folders are cached by absolute path; their last component is what the user recognises.
    return os.path.basename(model.rstrip("/\\")) or model if os.path.isabs(model) else model


@dataclass(frozen=True)
class HistoryPoint:
    """One bar of the history plot: a cell's peak memory.

    Attributes:
        cell: the execution count.
        peak: bytes (GPU allocated on a GPU, host RSS on the CPU), ``None`` when unknown.
        gpu: the peak is GPU memory.
        error: the cell ended with an exception.
    """

    cell: int
    peak: int | None
    gpu: bool
    error: bool


def history_points(records: Iterable[CellRecord]) -> list[HistoryPoint]:
    """The plot's data: one :class:`HistoryPoint` per cell record."""
    return [HistoryPoint(r.cell, r.report.peak, r.report.gpu, r.error is not None) for r in records]


def history_table_html(records: Sequence[CellRecord], last: int = 8) -> str:
    """An HTML table of the last ``last`` cells, newest first, with the columns of ``%vram history``.

    Args:
        records: the cell records, oldest first (``cell_history.records()``).
        last: how many of the newest to show.

    Example:
        ```python
        >>> from mlnb.monitor import cell_history
        >>> history_table_html(cell_history.records(), last=5)
        ```
    """
    if not records:
        return "<i>no cells recorded yet (the per-cell monitor starts with <code>%load_ext mlnb</code>)</i>"
    head = "".join(f"<th style='text-align:left;padding:0 6px'>{html.escape(h)}</th>" for h in CellHistory.HEADER)
    body = []
    for record in reversed(list(records)[-last:]):
        style = " style='color:#b00'" if record.error else ""
        cells = "".join(f"<td style='padding:0 6px'>{html.escape(c)}</td>" for c in record.row())
        body.append(f"<tr{style}>{cells}</tr>")
    return f"<table class='mlnb-history'><tr>{head}</tr>{''.join(body)}</table>"


def one_line(exc: BaseException) -> str:
    """An error as the one line the panel shows: mlnb's own messages as they are, others prefixed by their type."""
    from ..errors import MlnbError

    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, (MlnbError, ValueError)) and first:
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
