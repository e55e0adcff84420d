"""``MemoryMonitor``: measure the peak of a block and always clean up after it.

torch keeps one global peak counter per device. A monitor resets it on entry, so when monitors nest (the per-cell
monitor around a generation's), the inner reset would erase the outer's peak. Every monitor therefore folds the
counter into all open monitors before resetting it and again when it closes: each one ends with the true peak of
its own interval.
"""

from __future__ import annotations

import gc
import html
import logging
import threading
import time
from dataclasses import dataclass, replace

from ..device import Device, MemorySnapshot, get_device, host_peak_rss
from ..units import format_bytes, format_gib
from . import release

logger = logging.getLogger(__name__)

__all__ = ["MemoryMonitor", "MemoryReport", "cleanup"]

_open: list["MemoryMonitor"] = []
_open_lock = threading.Lock()


def cleanup(device: Device | None = None, collect: bool = True, empty_cache: bool = True,
            timings: list | None = None) -> list[str]:
    """One cleanup phase: ``gc.collect()`` then the device cache clear. Returns the steps that ran; with
    ``timings``, appends ``(step, seconds)`` for each to it."""
    device = device or get_device()
    steps = []
    began = time.perf_counter()
    if collect:
        gc.collect()
        steps.append("gc_collect")
        if timings is not None:
            timings.append(("gc_collect", time.perf_counter() - began))
    began = time.perf_counter()
    if empty_cache and device.empty_cache():
        steps.append("cuda_cache_clear")
        if timings is not None:
            timings.append(("cuda_cache_clear", time.perf_counter() - began))
    return steps


@dataclass(frozen=True)
class MemoryReport:
    """What memory did over one monitored block. Bytes; ``None`` is N/A (no GPU, NVML missing).

    ``freed`` is what the closing cleanup returned: reserved GPU memory before minus after it (host RSS on a CPU).
    When the block left its cleanup to the deferred release (``deferred``), nothing was freed when it ended: ``freed``
    is None, ``cached`` is what the allocator held unused then, and :func:`mlnb.monitor.release.last_release` says
    what the release gave back once the kernel was idle.
    ``host_peak_rss`` is exact when the process reached a new lifetime peak inside the block, else the larger of
    start and end.
    """

    gpu: bool
    device_name: str
    seconds: float
    start_allocated: int | None
    peak_allocated: int | None
    end_allocated: int | None
    start_reserved: int | None
    peak_reserved: int | None
    end_reserved: int | None
    device_used_start: int | None
    device_used_end: int | None
    device_total: int | None
    host_rss_start: int | None
    host_peak_rss: int | None
    host_rss_end: int | None
    freed: int | None
    cleanup: tuple[str, ...] = ()
    cleanup_seconds: float | None = None  # time the closing cleanup took (gc, cache clear)
    cleanup_timings: tuple[tuple[str, float], ...] = ()  # (step, seconds) of each, in the order they ran
    error: str | None = None  # the exception type that ended the block, if any
    # collect="if_needed": bytes still allocated above the start after the cache clear (what asks for a collection),
    # and what the collection then gave back (None when none ran)
    held_after_clear: int | None = None
    collected: int | None = None
    deferred: bool = False  # the cleanup was left to the deferred release (mlnb.monitor.release)

    @property
    def peak(self) -> int | None:
        """The headline peak: allocated on a GPU, host RSS on a CPU."""
        return self.peak_allocated if self.gpu else self.host_peak_rss

    @property
    def cached(self) -> int | None:
        """Bytes the allocator held reserved but unused when the block ended (what a cache clear gives back)."""
        if self.end_reserved is None or self.end_allocated is None:
            return None
        return max(0, self.end_reserved - self.end_allocated)

    def freed_text(self) -> str:
        """``freed 3.6 GiB``, or ``freed when idle`` when the deferred release gives the memory back later."""
        return "freed when idle" if self.deferred else f"freed {format_bytes(self.freed)}"

    def summary(self) -> str:
        """One line: ``peak 3.7 / 4.0 GiB · freed 3.6 GiB`` (GPU; ``freed when idle`` when the cleanup is deferred)
        or ``host RSS peak 1.2 GiB · freed 0 B`` (CPU)."""
        if self.gpu:
            total = f" / {format_gib(self.device_total)}" if self.device_total else ""
            peak = f"peak {format_gib(self.peak_allocated)}{total} GiB"
        else:
            peak = f"host RSS peak {format_bytes(self.host_peak_rss)}"
        return f"{peak} · {self.freed_text()}"

    def rows(self) -> list[tuple[str, str, str, str]]:
        """``(what, start, peak, end)`` rows for tables."""
        rows = []
        if self.gpu:
            rows.append(("allocated", *(format_bytes(v) for v in (self.start_allocated, self.peak_allocated, self.end_allocated))))
            rows.append(("reserved", *(format_bytes(v) for v in (self.start_reserved, self.peak_reserved, self.end_reserved))))
            rows.append(("device used (NVML)", format_bytes(self.device_used_start), "", format_bytes(self.device_used_end)))
        rows.append(("host RSS", *(format_bytes(v) for v in (self.host_rss_start, self.host_peak_rss, self.host_rss_end))))
        return rows

    def __str__(self) -> str:
        lines = [f"MemoryReport on {self.device_name}: {self.seconds:.2f} s · {self.summary()}"]
        lines += [f"  {what:<20} {a:>10} {b:>10} {c:>10}" for what, a, b, c in [("", "start", "peak", "end"), *self.rows()]]
        if self.error:
            lines.append(f"  ended by {self.error}")
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        head = "<tr><th></th><th>start</th><th>peak</th><th>end</th></tr>"
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows()
        )
        caption = html.escape(f"{self.device_name}: {self.seconds:.2f} s · {self.summary()}")
        return f"<table class='mlnb-memory'><caption>{caption}</caption>{head}{body}</table>"


class MemoryMonitor:
    """Context manager that measures the peak memory of a block and always cleans up after it (at once, or, with
    ``defer``, once the kernel is idle).

    On enter it synchronizes, records the start and resets the peak counter. On exit (also on an exception or
    ``KeyboardInterrupt``) it records the peak and end, runs a cleanup phase and computes what was freed. Nesting is
    safe: each monitor reports the peak of its own interval.

    Args:
        device: the device to watch (default: :func:`mlnb.device.get_device`).
        collect: run ``gc.collect()`` in the closing cleanup: ``True`` always; ``"if_needed"`` only when, after the
            cache clear, more GPU memory is still allocated than at the start (a reference cycle may hold tensors),
            or the block raised; a full collection scans every object of a process that has torch and a pipeline
            loaded (about 0.2 s for 400,000 objects). On a device without memory counters there is no GPU memory to
            give back, and Python's own collector finds host cycles: ``"if_needed"`` collects only after an error.
        empty_cache: clear the CUDA caching allocator in the closing cleanup.
        defer: a generation's monitor: when the block ends without an error, leave the cleanup (the cache clear and
            the collection ``collect`` allows) to the deferred release (:mod:`mlnb.monitor.release`), which gives
            the memory back once the kernel is idle, unless another generation starts first. An error or an
            interrupt still cleans up at once. No release runs while the block does. The report says ``freed when
            idle``. On a device without memory counters there is nothing to defer.
        light: measure with the allocator's counters only, without synchronizing, reading NVML or the host's RSS
            (the per-cell monitor, which reads them itself when a cell touched the GPU). On a device without memory
            counters the host's RSS is still read: it is what is measured there.

    Example:
        ```python
        >>> from mlnb import MemoryMonitor
        >>> with MemoryMonitor() as mon:
        ...     image = pipe("a fox").images[0]
        >>> mon.get_peak_memory(), mon.report.freed
        ```
    """

    def __init__(self, device: Device | None = None, collect: bool | str = True, empty_cache: bool = True,
                 defer: bool = False, light: bool = False) -> None:
        if collect not in (True, False, "if_needed"):
            raise ValueError(f"collect must be True, False or 'if_needed', got {collect!r}")
        if device is not None and not isinstance(device, Device):
            raise TypeError(f"device must be an mlnb Device (mlnb.get_device()), got {type(device).__name__}")
        self.device = device or get_device()
        self.collect = collect
        self.empty_cache = empty_cache
        self.defer = bool(defer) and self.device.has_memory_counters
        self.light = bool(light)
        self.report: MemoryReport | None = None
        self._start: MemorySnapshot | None = None
        self._peak_allocated: int | None = None
        self._peak_reserved: int | None = None
        self._host_peak_at_start: int | None = None

    # Peaks are folded in by monitors nested inside this one.
    def _fold(self, snap: MemorySnapshot) -> None:
        if snap.peak_allocated is not None:
            self._peak_allocated = max(self._peak_allocated or 0, snap.peak_allocated)
        if snap.peak_reserved is not None:
            self._peak_reserved = max(self._peak_reserved or 0, snap.peak_reserved)

    def __enter__(self) -> "MemoryMonitor":
        if self._start is not None and self.report is None:
            raise RuntimeError("this MemoryMonitor is already open: nest a new MemoryMonitor() instead")
        dev = self.device
        self._peak_allocated = self._peak_reserved = None  # a monitor used again measures its new block only
        if self.defer:  # first: a release running now ends before the start is read
            release.generation_started()
        try:
            self._begin(dev)
        except BaseException:
            if self.defer:
                release.generation_ended(dev, None, used=False)
            raise
        self._host_peak_at_start = host_peak_rss()
        self.report = None
        return self

    def _read(self, dev: Device) -> MemorySnapshot:
        return dev.counters() if self.light and dev.has_memory_counters else dev.snapshot()

    def _begin(self, dev: Device) -> None:
        if dev.has_memory_counters and not self.light:
            dev.synchronize()
        with _open_lock:
            before = self._read(dev)
            for outer in _open:
                if outer.device is dev:
                    outer._fold(before)
            dev.reset_peak()
            # Nothing ran since: the peaks restart at the current values, and reading the card again (NVML, the
            # host's RSS) would cost each cell the time of a second snapshot.
            self._start = replace(before, peak_allocated=before.allocated, peak_reserved=before.reserved)
            self._fold(self._start)
            _open.append(self)

    def __exit__(self, exc_type, exc, tb) -> bool:
        del exc, tb  # the traceback's frames must not outlive this call: the cleanup may need to free them
        if not self.defer:
            self._end(exc_type)
            return False
        used = False
        try:
            self._end(exc_type)
            used = exc_type is None and self._left_memory()
        finally:
            start = self._start.allocated if self._start is not None else None
            release.generation_ended(self.device, start, used, collect=bool(self.collect),
                                     empty_cache=self.empty_cache)
        return False

    def _left_memory(self) -> bool:
        """The deferred block left something for the release: cached blocks, or more allocated than at its start."""
        r = self.report
        return bool(r.cached) or (r.end_allocated or 0) > (r.start_allocated or 0)

    def _end(self, exc_type) -> None:
        dev = self.device
        try:
            if dev.has_memory_counters and not self.light:
                dev.synchronize()
        except BaseException as sync_error:  # a failed kernel can make synchronize raise; still clean up
            logger.debug("synchronize failed during monitor exit: %s", sync_error)
        with _open_lock:
            at_exit = self._read(dev)
            self._fold(at_exit)
            if self in _open:
                _open.remove(self)
            for outer in _open:
                if outer.device is dev:
                    outer._fold(at_exit)
        began = time.perf_counter()
        timings: list = []
        held = collected = None
        deferred = self.defer and exc_type is None
        if deferred:  # the release cleans up once the kernel is idle
            steps = []
        elif self.collect == "if_needed" and exc_type is None:
            steps = cleanup(dev, collect=False, empty_cache=self.empty_cache, timings=timings)
            if dev.has_memory_counters:
                steps, held, collected = self._collect_if_held(dev, steps, timings)
        else:  # True, False, or "if_needed" after an error (collects)
            steps = cleanup(dev, collect=bool(self.collect), empty_cache=self.empty_cache, timings=timings)
        cleanup_seconds = time.perf_counter() - began
        end = dev.snapshot() if steps else at_exit  # nothing ran: the state is the one just read
        self.report = self._build_report(at_exit, end, steps, exc_type, cleanup_seconds, tuple(timings), held,
                                         collected, deferred)

    def _collect_if_held(self, dev: Device, steps: list[str], timings: list):
        """``collect="if_needed"`` after the cache clear: a full collection when more is allocated than at the start
        (a reference cycle may hold tensors). Returns the steps, the bytes held above the start and what the
        collection gave back (both None when nothing was held)."""
        start = (self._start.allocated if self._start is not None else None) or 0
        now = dev.snapshot().allocated or 0
        if now <= start:
            return steps, None, None
        steps = cleanup(dev, collect=True, empty_cache=self.empty_cache, timings=timings)
        return steps, now - start, max(0, now - (dev.snapshot().allocated or 0))

    def _build_report(
        self, at_exit: MemorySnapshot, end: MemorySnapshot, steps, exc_type, cleanup_seconds: float | None = None,
        cleanup_timings: tuple = (), held_after_clear: int | None = None, collected: int | None = None,
        deferred: bool = False,
    ) -> MemoryReport:
        start = self._start
        assert start is not None
        gpu = self.device.has_memory_counters
        name, total = self.device.describe()
        if deferred:
            freed = None
        elif gpu:
            freed = max(0, (at_exit.reserved or 0) - (end.reserved or 0))
        else:
            freed = None if at_exit.host_rss is None or end.host_rss is None else max(0, at_exit.host_rss - end.host_rss)
        host_candidates = [v for v in (start.host_rss, at_exit.host_rss, end.host_rss) if v is not None]
        host_peak = max(host_candidates) if host_candidates else None
        lifetime_peak = host_peak_rss()
        if lifetime_peak is not None and self._host_peak_at_start is not None and lifetime_peak > self._host_peak_at_start:
            host_peak = max(host_peak or 0, lifetime_peak)
        return MemoryReport(
            gpu=gpu,
            device_name=name,
            seconds=end.time - start.time,
            start_allocated=start.allocated,
            peak_allocated=self._peak_allocated if gpu else None,
            end_allocated=end.allocated,
            start_reserved=start.reserved,
            peak_reserved=self._peak_reserved if gpu else None,
            end_reserved=end.reserved,
            device_used_start=start.device_used,
            device_used_end=end.device_used,
            device_total=total,
            host_rss_start=start.host_rss,
            host_peak_rss=host_peak,
            host_rss_end=end.host_rss,
            freed=freed,
            cleanup=tuple(steps),
            cleanup_seconds=cleanup_seconds,
            cleanup_timings=cleanup_timings,
            error=exc_type.__name__ if exc_type is not None else None,
            held_after_clear=held_after_clear,
            collected=collected,
            deferred=deferred,
        )

    def get_peak_memory(self) -> int | None:
        """Peak bytes of the block so far (allocated on a GPU; host RSS on a CPU, known after exit)."""
        if self.report is not None:
            return self.report.peak
        if self._start is None:  # not entered yet: nothing measured
            return None
        if self.device.has_memory_counters:
            snap = self.device.snapshot()
            self._fold(snap)
            return self._peak_allocated
        return None

    def __repr__(self) -> str:
        state = "not entered" if self._start is None else ("open" if self.report is None else self.report.summary())
        return f"MemoryMonitor({self.device.info().name}, {state})"
