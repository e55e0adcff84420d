"""The notebook session's state shared by the magics and the dashboard: defaults, status, and freeing memory.

Nothing here prints; the UI layers render the result objects.
"""

from __future__ import annotations

import html
import os
import threading
from dataclasses import dataclass, field

from .device import Device, DeviceInfo, get_device
from .levels import AUTO, LevelChoice, choose_level, describe_auto, parse_level
from .units import format_bytes, parse_bytes

__all__ = [
    "SessionDefaults", "defaults", "default_model", "budget_of", "pipeline_choice", "Status", "status", "FreeReport",
    "free_memory", "memory_rows",
]


@dataclass
class SessionDefaults:
    """Defaults for ``%%generate`` and the dashboard's Generate button.

    Attributes:
        model: the last model used (``MLNB_MODEL`` when unset).
        level: ``"auto"``, a level name, or a VRAM budget (``"4.0 GiB"``) for the budget planner.
        verbose: the per-cell line also for cells that did not touch the GPU.
        monitor: per-cell monitoring on (``%vram on|off``).
    """

    model: str | None = None
    level: str = AUTO
    verbose: bool = False
    monitor: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set_level(self, level: str) -> str:
        """Validate and set the default: a level name, ``auto``, or a VRAM budget such as ``4GiB`` (kept as
        ``"4.0 GiB"``); returns what was set. Raises ValueError, naming both forms, for anything else."""
        try:
            parsed = parse_level(level)
            value = AUTO if parsed is None else parsed.value
        except ValueError as exc:
            budget = budget_of(level)
            if budget is None:
                raise ValueError(f"{exc}, or a VRAM budget such as 4GiB") from None
            if budget < _SMALLEST_BUDGET:  # "4" without its unit is 4 bytes
                raise ValueError(f"a VRAM budget of {format_bytes(budget)} holds no model; give a unit, such as 4GiB") \
                    from None
            value = format_bytes(budget)
        with self._lock:
            self.level = value
        return self.level


_SMALLEST_BUDGET = 64 * 2**20


def budget_of(level: str | None) -> int | None:
    """The bytes of a VRAM budget given where a level is (``"4GiB"``, ``"4.0 GiB"``), or None for anything else."""
    if not level:
        return None
    try:
        budget = parse_bytes(str(level))
    except ValueError:
        return None
    return budget if budget > 0 else None


def pipeline_choice(level: str) -> dict:
    """``load_pipeline``'s keyword for a session default: ``{"budget": bytes}`` or ``{"level": name}``."""
    budget = budget_of(level)
    return {"budget": budget} if budget is not None else {"level": level}


defaults = SessionDefaults()


def default_model() -> str | None:
    """The model ``%%generate`` uses when none is named: the last one, else ``$MLNB_MODEL``."""
    return defaults.model or os.environ.get("MLNB_MODEL") or None


@dataclass(frozen=True)
class PipelineStatus:
    model: str
    dtype: str
    level: str
    techniques: str
    weights: str  # e.g. "1.9 GiB"
    location: dict[str, str]


@dataclass(frozen=True)
class Status:
    """``%vram`` with no argument: the device, memory, the level auto would pick, and what is loaded."""

    info: DeviceInfo
    auto: LevelChoice
    default_level: str
    pipelines: tuple[PipelineStatus, ...]

    def rows(self) -> list[tuple[str, str]]:
        i = self.info
        rows = [("device", i.name), *memory_rows(i)]
        if i.available:
            rows += [
                ("device-wide used (NVML)",
                 f"{format_bytes(i.nvml_used_bytes)} / {format_bytes(i.nvml_total_bytes)}"
                 + (f"  ({i.nvml_error})" if i.nvml_error else "")),
                ("torch allocated / reserved", f"{format_bytes(i.allocated_bytes)} / {format_bytes(i.reserved_bytes)}"),
            ]
        budget = budget_of(self.default_level) is not None
        rows.append(("default budget" if budget else "default level", self.default_level))
        if not self.pipelines:
            rows.append(("pipelines", "none loaded"))
        for p in self.pipelines:
            where = ", ".join(f"{k}: {v}" for k, v in p.location.items())
            rows.append((f"pipeline {p.model}", f"{p.dtype}, level {p.level} ({p.techniques}), {p.weights}; {where}"))
        return rows

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.rows())

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in self.rows())
        return f"<table class='mlnb-status'>{body}</table>"


def memory_rows(info: DeviceInfo) -> list[tuple[str, str]]:
    """The rows ``%vram`` and ``mlnb doctor`` share: free and total VRAM (with a GPU), host RAM, and what ``auto``
    does here."""
    rows = []
    if info.available:
        rows.append(("VRAM free / total", f"{format_bytes(info.free_bytes)} / {format_bytes(info.total_bytes)}"))
    rows.append(("host RAM available / total",
                 f"{format_bytes(info.host_available_bytes)} / {format_bytes(info.host_total_bytes)}"))
    rows.append(("auto level", describe_auto(info.free_bytes, info.kind == "cuda")))
    return rows


def status(device: Device | None = None) -> Status:
    """Gather the :class:`Status` (never raises for a missing GPU or NVML)."""
    from .pipeline import cached_pipelines
    from .pipeline.loading import dtype_name

    device = device or get_device()
    info = device.info()
    pipes = tuple(
        PipelineStatus(
            model=m.model, dtype=dtype_name(m.dtype), techniques=m.techniques.summary(),
            level=m.level.value if m.plan is None else f"{m.level.value}, plan for {format_bytes(m.plan.budget)}",
            weights=format_bytes(m.weight_bytes), location=m.weights_location(),
        )
        for m in cached_pipelines()
    )
    return Status(info=info, auto=choose_level(info.free_bytes), default_level=defaults.level, pipelines=pipes)


@dataclass(frozen=True)
class FreeReport:
    """What ``%vram free`` (or the dashboard's Free button) did."""

    unloaded: int
    outputs_dropped: tuple[str, ...]
    allocated_before: int | None
    allocated_after: int | None
    reserved_before: int | None
    reserved_after: int | None
    rss_before: int | None
    rss_after: int | None

    @property
    def freed(self) -> int | None:
        if self.reserved_before is not None and self.reserved_after is not None:
            return max(0, self.reserved_before - self.reserved_after)
        if self.rss_before is not None and self.rss_after is not None:
            return max(0, self.rss_before - self.rss_after)
        return None

    def __str__(self) -> str:
        parts = [f"unloaded {self.unloaded} pipeline(s)"]
        if self.outputs_dropped:
            pinned = "CUDA tensors" if self.reserved_before is not None else "large host tensors"  # no GPU: host
            parts.append(f"dropped {len(self.outputs_dropped)} output(s) pinning {pinned} ({', '.join(self.outputs_dropped)})")
        if self.reserved_before is not None:
            parts.append(
                f"GPU reserved {format_bytes(self.reserved_before)} -> {format_bytes(self.reserved_after)}, "
                f"allocated {format_bytes(self.allocated_before)} -> {format_bytes(self.allocated_after)}"
            )
        else:
            parts.append(f"host RSS {format_bytes(self.rss_before)} -> {format_bytes(self.rss_after)}")
        parts.append(f"freed {format_bytes(self.freed)}")
        return " · ".join(parts)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        return f"<code>{html.escape(str(self))}</code>"


def free_memory(device: Device | None = None, drop_outputs=None) -> FreeReport:
    """Unload every cached pipeline and clean up; ``drop_outputs`` (a callable returning dropped names) runs first."""
    from .pipeline import unload_all

    device = device or get_device()
    before = device.snapshot()
    dropped = tuple(drop_outputs()) if drop_outputs is not None else ()
    count = unload_all(device)
    after = device.snapshot()
    return FreeReport(
        unloaded=count, outputs_dropped=dropped,
        allocated_before=before.allocated, allocated_after=after.allocated,
        reserved_before=before.reserved, reserved_after=after.reserved,
        rss_before=before.host_rss, rss_after=after.host_rss,
    )
