"""Every cell inside a ``MemoryMonitor``, through ``pre_run_cell``/``post_run_cell``.

``pre_execute``/``post_execute`` also fire for widget comm messages, so they would measure the dashboard, not the
user's cells. The hooks read only the allocator's counters (no synchronize, no NVML), so a cell that did not touch
the GPU costs little and is silent.

After a cell that touched the GPU, the deferred release (:mod:`mlnb.monitor.release`) gives the allocator's cache
back in the background once the cell has ended, unless the next cell starts a generation first; its line says
``freed when idle``. After an error the cleanup runs at once: the stored traceback's frames that alone pin device
tensors are cleared (not when the namespace or the output cache holds them too: a model's weights seen through a
method's ``self`` stay whatever happens), every other frame keeps its locals for ``%debug``, then ``gc.collect()``
and the cache clear. An output that pins device tensors is pointed out. A cell that showed its own memory report (a
generation's report line, what ``%vram free`` freed, a magic's one-line error) gets no line of its own beside it,
only the notes. The history keeps each cell's first line with secrets masked.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import sys

from IPython.core.error import UsageError

from ..device import Device, get_device
from .. import notices
from ..monitor import CellRecord, MemoryMonitor, Skipped, cell_history, find_device_tensors, release
from ..monitor.history import source_line
from ..session import FreeReport, defaults
from ..units import format_bytes
from .tensors import clear_pinning_frames, stored_traceback, tensors_only_in_traceback

logger = logging.getLogger(__name__)

__all__ = ["CellMonitor", "touched_gpu"]


def touched_gpu(report) -> bool:
    """True if the monitored block allocated, freed or reserved GPU memory. Reserved memory that went down is not
    the block's doing: a deferred release can run beside a cell."""
    if not report.gpu:
        return False
    return (
        (report.peak_allocated or 0) > (report.start_allocated or 0)
        or report.end_allocated != report.start_allocated
        or (report.end_reserved or 0) > (report.start_reserved or 0)
    )


class CellMonitor:
    """The per-cell hooks. ``pre_run_cell``/``post_run_cell`` are the bound methods registered on the shell.

    Args:
        shell: the IPython shell.
        device: the device to watch (default: the current device, looked up at each cell).
        echo: where the per-cell line goes (default ``print``).
    """

    def __init__(self, shell, device: Device | None = None, echo=print) -> None:
        self.shell = shell
        self._device = device
        self.echo = echo
        self._monitor: MemoryMonitor | None = None
        self._cell: int | None = None
        self._source = ""
        self._last_generation = None  # mlnb.last_result() when the cell started

    @property
    def device(self) -> Device:
        return self._device or get_device()

    def pre_run_cell(self, info=None) -> None:
        try:
            release.cell_started()
            if self._monitor is not None:  # the last cell never reached post_run_cell
                self._monitor.__exit__(None, None, None)
                self._monitor = None
            self._last_generation = _last_generation()
            notices.new_cell()  # a library notice said in the last cell is said again in this one
            if not defaults.monitor:
                return
            if getattr(info, "store_history", True) is False:
                # A frontend's own code (a variable inspector, a widget's callback), not a numbered cell: it would
                # take the next cell's number in the lines and the history.
                return
            self._cell = getattr(self.shell, "execution_count", None)
            self._source = source_line(getattr(info, "raw_cell", "") or "")
            # Cleanup decisions are made after the cell, from what it did; the monitor only measures, cheaply.
            self._monitor = MemoryMonitor(self.device, collect=False, empty_cache=False, light=True).__enter__()
        except Exception as exc:  # a hook must never break the user's cell
            logger.debug("pre_run_cell failed: %s", exc)
            self._monitor = None

    def close(self) -> None:
        """Close the current cell's monitor without a report (the extension is unloaded inside that cell, so its
        ``post_run_cell`` will not run): an open monitor would take every later monitor's peaks for good."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            try:
                monitor.__exit__(None, None, None)
            except Exception as exc:
                logger.debug("closing the cell monitor failed: %s", exc)
        release.cell_ended()  # no post_run_cell will say so

    def post_run_cell(self, result=None) -> None:
        monitor, self._monitor = self._monitor, None
        try:
            if monitor is not None:
                self._after_cell(monitor, result)
        except Exception as exc:
            logger.debug("post_run_cell failed: %s", exc)
        finally:
            release.cell_ended()  # the kernel is idle: a pending release runs in the background

    def _after_cell(self, monitor: MemoryMonitor, result) -> None:
        count = getattr(result, "execution_count", None)
        if count is not None:  # ipykernel 7 has already advanced shell.execution_count when pre_run_cell fires
            self._cell = count
        error = getattr(result, "error_in_exec", None) or getattr(result, "error_before_exec", None)
        exc_info = (type(error), error, error.__traceback__) if error is not None else (None, None, None)
        monitor.__exit__(*exc_info)
        report = monitor.report
        device = self.device
        notes: list[str] = []
        touched = touched_gpu(report)

        if error is not None:
            tb = stored_traceback(self.shell)
            skipped = Skipped()
            pinned = tensors_only_in_traceback(tb, self.shell, device, skipped)
            if pinned:
                total = sum(r.nbytes for r in pinned)
                frames = clear_pinning_frames(tb, pinned, device)
                # What the check could not look into is said with what it did: after every error, a line about a
                # lazy proxy somewhere in the namespace would be noise.
                notes.append(
                    f"cleared {frames} traceback frame(s) pinning {format_bytes(total)} of GPU tensors "
                    f"({pinned[0].path}); %debug will not see their locals" + (f"; {skipped.line()}" if skipped else "")
                )
        value = getattr(result, "result", None)
        pinned = find_device_tensors([(f"Out[{self._cell}]", value)], device) if value is not None else []
        if pinned:
            notes.append(
                f"Out[{self._cell}] pins {format_bytes(sum(r.nbytes for r in pinned))} of GPU tensors; "
                "%vram free --outputs drops it"
            )

        freed_extra = 0
        if error is not None:  # at once: the error's frames may have held tensors
            before = device.snapshot()
            gc.collect()
            device.empty_cache()
            after = device.snapshot()
            if before.reserved is not None and after.reserved is not None:
                freed_extra = max(0, before.reserved - after.reserved)
        elif touched:  # once the kernel is idle, in the background
            release.request(device, report.start_allocated)
            report = dataclasses.replace(report, freed=None, deferred=True)
        if freed_extra:
            report = _with_freed(report, (report.freed or 0) + freed_extra, after)

        cell = self._cell if self._cell is not None else len(cell_history) + 1
        record = CellRecord(
            cell=cell, source=self._source, report=report, touched_gpu=touched or bool(freed_extra),
            error=type(error).__name__ if error is not None else None, notes=tuple(notes),
        )
        cell_history.append(record)
        if self._reported_itself(result, error):
            for note in notes:
                self.echo(f"[mlnb] {note}")
            return
        if record.touched_gpu or notes or defaults.verbose:
            self.echo(self.line(record))

    def _reported_itself(self, result, error) -> bool:
        """Whether the cell showed its own memory report, which the per-cell line would repeat or contradict (a
        line saying ``freed 0 B`` under what ``%vram free`` freed): a generation ended in it (``mlnb.last_result()``
        changed, whether or not ``--quiet`` displayed it), its value is a :class:`~mlnb.session.FreeReport`, or it
        ended in a magic's one-line error."""
        last = _last_generation()
        return ((last is not None and last is not self._last_generation)
                or isinstance(getattr(result, "result", None), FreeReport) or isinstance(error, UsageError))

    @staticmethod
    def line(record: CellRecord) -> str:
        """The per-cell line, e.g. ``[mlnb] cell 5 · 2.31 s · peak 3.7 GiB · end 0.2 GiB · freed when idle`` (``freed
        3.5 GiB`` after an error, which cleans up at once)."""
        r = record.report
        if r.gpu:
            mem = f"peak {format_bytes(r.peak_allocated)} · end {format_bytes(r.end_allocated)} · {r.freed_text()}"
        else:
            mem = f"host RSS {format_bytes(r.host_rss_end)} (peak {format_bytes(r.host_peak_rss)})"
        text = f"[mlnb] cell {record.cell} · {r.seconds:.2f} s · {mem}"
        if record.notes:
            text += "\n" + "\n".join(f"[mlnb] {note}" for note in record.notes)
        return text


def _last_generation():
    """The last GenerationResult, without importing the pipeline cache into a session that never loaded it."""
    cache = sys.modules.get("mlnb.pipeline.cache")
    return cache.last_result() if cache is not None else None


def _with_freed(report, freed: int, after):
    return dataclasses.replace(report, freed=freed, end_allocated=after.allocated, end_reserved=after.reserved)

