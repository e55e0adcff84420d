"""What ``%vram`` (and ``mlnb doctor``) shows of the session, and freeing its memory: the status table and the free
report. Nothing here prints; the UI layers render the result objects.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from ..device import Device, DeviceInfo, get_device
from ..levels import LevelChoice, choose_level, describe_auto
from ..monitor import release
from ..setting import MemorySetting
from ..units import format_bytes
from .defaults import defaults

__all__ = ["LoraStatus", "PipelineStatus", "Status", "status", "FreeReport", "free_memory", "memory_rows"]


@dataclass(frozen=True)
class LoraStatus:
    """An active LoRA of a loaded pipeline: as the user gave it, and its adapter weights' bytes."""

    source: str
    scale: float
    nbytes: int  # in bytes, in the dtype the adapters compute in

    def __str__(self) -> str:
        scale = "" if self.scale == 1 else f" at {self.scale:g}"
        return f"{self.source}{scale}, {format_bytes(self.nbytes)}"


@dataclass(frozen=True)
class PipelineStatus:
    model: str
    dtype: str
    level: str
    techniques: str
    weights: str  # e.g. "1.9 GiB"
    location: dict[str, str]
    loras: tuple[LoraStatus, ...] = ()


@dataclass(frozen=True)
class Status:
    """``%vram`` with no argument: the device, memory, the level auto would pick, and what is loaded."""

    info: DeviceInfo
    auto: LevelChoice
    default: MemorySetting
    pipelines: tuple[PipelineStatus, ...]
    idle_release: str | None = None  # what the last deferred release gave back, or that one is pending

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
        if self.idle_release:
            rows.append(("last idle release", self.idle_release))
        rows.append((f"default {self.default.kind}", str(self.default)))
        if not self.pipelines:
            rows.append(("pipelines", "none loaded"))
        for p in self.pipelines:
            where = ", ".join(f"{k}: {v}" for k, v in p.location.items())
            rows.append((f"pipeline {p.model}", f"{p.dtype}, level {p.level} ({p.techniques}), {p.weights}; {where}"))
            rows += [("  LoRA", str(lora)) for lora in p.loras]
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
    from ..pipeline import cached_pipelines
    from ..pipeline.files import dtype_name

    device = device or get_device()
    info = device.info()
    pipes = tuple(
        PipelineStatus(
            model=m.model, dtype=dtype_name(m.dtype), techniques=m.techniques.summary(),
            level=m.level.value if m.plan is None else f"{m.level.value}, plan for {m.setting.show_budget(m.plan.budget)}",
            weights=format_bytes(m.weight_bytes), location=m.weights_location(),
            loras=tuple(LoraStatus(a.spec.source, a.spec.scale, a.nbytes) for a in m.loras),
        )
        for m in cached_pipelines()
    )
    return Status(info=info, auto=choose_level(info.free_bytes), default=defaults.setting, pipelines=pipes,
                  idle_release=_idle_release())


def _idle_release() -> str | None:
    """``freed 3.5 GiB when idle (0.31 s)``, what the last deferred release did, or that one is pending."""
    last = release.last_release()
    if release.pending():
        return "pending: runs once the kernel is idle" + (f" (last: {last})" if last is not None else "")
    return str(last) if last is not None else None


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
    from ..pipeline import unload_all

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
