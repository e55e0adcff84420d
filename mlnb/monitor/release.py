"""The deferred release: GPU memory given back once the kernel is idle, not inside a generation.

Clearing the caching allocator costs about a third of a second with SDXL's cache, and the next image pays again to
regrow it; a full ``gc.collect()`` with a pipeline loaded costs about 0.2 s. A generation that ends without an error
therefore does neither. It asks for a release instead, which runs in a background thread:

- in IPython, when the cell ends (:func:`cell_ended`, from the per-cell hook), :data:`CELL_DELAY` seconds later, so
  that the cell's completion never waits for it;
- elsewhere (plain Python, the dashboard's worker between cells), once :data:`IDLE_DELAY` seconds have passed without
  a new generation.

A generation start and the release exclude each other. :func:`generation_started` advances an epoch and counts the
generation as running; a release runs only if the epoch is still the one it was scheduled in and no generation runs,
and a generation that starts while a release is running waits for it to end. So back-to-back generations in one cell
or loop pay no release between them. A cell start does not postpone a due release: with ``Run All`` the next cell
starts at once, and memory would otherwise stay cached until the last cell.

A release first calls the idle hooks (:func:`add_idle_hook`: code that keeps GPU buffers for the next image drops them
here), then runs a full ``gc.collect()`` only when more GPU memory is allocated than before the first generation it
follows (a reference cycle may hold tensors), then clears the device's cache. :func:`last_release` says what it
gave back.

An error, an interrupt, an unload, the OOM rescue, ``%vram free`` and making room for another model clean up at once,
not through this module.
"""

from __future__ import annotations

import atexit
import gc
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

from ..device import Device
from ..units import format_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "CELL_DELAY", "IDLE_DELAY", "Release", "add_idle_hook", "cell_started", "cell_ended", "generation_started",
    "generation_ended", "request", "pending", "last_release", "release_now", "wait_idle",
]

CELL_DELAY = 0.05  # seconds from a cell's end to its release: the kernel answers the cell first
IDLE_DELAY = 1.0  # seconds without a new generation, outside a cell, before a release


@dataclass(frozen=True)
class Release:
    """What one release did on one device. Bytes; ``None`` is N/A.

    Attributes:
        device_name: the device it ran on.
        reserved_before, reserved_after: the allocator's reserved memory before and after it.
        allocated_before, allocated_after: allocated memory before and after it (a collection can lower it).
        collected: a full ``gc.collect()`` ran (more was allocated than before the generations it follows).
        hooks: idle hooks called.
        seconds: how long it took.
        ended: ``time.perf_counter()`` when it ended.
    """

    device_name: str
    reserved_before: int | None
    reserved_after: int | None
    allocated_before: int | None
    allocated_after: int | None
    collected: bool
    hooks: int
    seconds: float
    ended: float

    @property
    def freed(self) -> int | None:
        """Reserved bytes it gave back to the driver."""
        if self.reserved_before is None or self.reserved_after is None:
            return None
        return max(0, self.reserved_before - self.reserved_after)

    def __str__(self) -> str:
        collected = ", with gc.collect" if self.collected else ""
        return f"freed {format_bytes(self.freed)} when idle ({self.seconds:.2f} s{collected})"


@dataclass
class _Pending:
    device: Device
    baseline: int  # allocated bytes before the first generation (or cell) it follows
    collect: bool
    empty_cache: bool


class _Releaser:
    """The state behind the module's functions: one per process."""

    def __init__(self) -> None:
        self._state = threading.Condition(threading.Lock())  # guards everything below; held briefly
        self._running = threading.Lock()  # held while a release runs: a generation start waits on it
        self._epoch = 0
        self._active = 0  # generations running (the dashboard's thread can run one beside a cell's)
        self._in_cell = False
        self._pending: dict[int, _Pending] = {}  # by id(device)
        self._due: float | None = None  # time.monotonic() when a release is due; None: none scheduled
        self._worker: threading.Thread | None = None
        self._closed = False
        self._hooks: list[Callable[[], Callable[[], None] | None]] = []  # each returns the hook, None once gone
        self.last: Release | None = None
        self.count = 0  # releases that ran

    # -- what the rest of mlnb reports -----------------------------------------------------------------------------

    def generation_started(self) -> None:
        with self._state:
            self._epoch += 1
            self._active += 1
            self._due = None
        with self._running:  # a release already running ends first
            pass

    def generation_ended(self, device: Device, baseline: int | None, used: bool, collect: bool,
                         empty_cache: bool) -> None:
        with self._state:
            self._active = max(0, self._active - 1)
            if used:
                self._add(device, baseline, collect, empty_cache)
            if not self._in_cell:
                self._schedule(IDLE_DELAY)

    def request(self, device: Device, baseline: int | None, collect: bool = True, empty_cache: bool = True) -> None:
        with self._state:
            self._add(device, baseline, collect, empty_cache)
            if not self._in_cell:
                self._schedule(IDLE_DELAY)

    def cell_started(self) -> None:
        with self._state:
            self._in_cell = True

    def cell_ended(self) -> None:
        with self._state:
            self._in_cell = False
            self._schedule(CELL_DELAY)

    def _add(self, device: Device, baseline: int | None, collect: bool, empty_cache: bool) -> None:
        if not device.has_memory_counters:
            return
        baseline = baseline or 0
        known = self._pending.get(id(device))
        if known is None or known.device is not device:
            self._pending[id(device)] = _Pending(device, baseline, collect, empty_cache)
        else:
            known.baseline = min(known.baseline, baseline)
            known.collect |= collect
            known.empty_cache |= empty_cache

    def _schedule(self, delay: float) -> None:
        """Make a release due ``delay`` seconds from now, when one is pending and no generation runs (the
        ``_state`` lock held)."""
        if not self._pending or self._active or self._closed:
            return
        self._due = time.monotonic() + delay
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._loop, name="mlnb-release", daemon=True)
            self._worker.start()
        self._state.notify_all()

    # -- the worker ------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._state:
                while self._due is None or self._due > time.monotonic():
                    if self._closed:
                        return
                    self._state.wait(None if self._due is None else self._due - time.monotonic())
                self._due = None
                epoch = self._epoch
            try:
                self._run(epoch)
            except Exception as exc:  # a release must never kill its thread
                logger.debug("the deferred release failed: %s", exc)

    def _run(self, epoch: int | None) -> list[Release]:
        """Release what is pending, if ``epoch`` is still current (None: whatever the epoch) and no generation
        runs. Returns what each device's release did."""
        with self._running:
            with self._state:
                if (epoch is not None and epoch != self._epoch) or self._active or not self._pending:
                    return []
                pending, self._pending = list(self._pending.values()), {}
            hooks = self._call_hooks()
            done = [self._release(p, hooks) for p in pending]
            with self._state:
                self.count += 1
                if done:
                    self.last = done[-1]
                self._state.notify_all()
            return done

    def _call_hooks(self) -> int:
        with self._state:
            hooks = [ref() for ref in self._hooks]
            self._hooks = [ref for ref, hook in zip(self._hooks, hooks) if hook is not None]
        called = 0
        for hook in hooks:
            if hook is None:
                continue
            try:
                hook()
                called += 1
            except Exception as exc:  # one hook's failure leaves the others and the release to run
                logger.debug("idle hook %r failed: %s", hook, exc)
        return called

    @staticmethod
    def _release(p: _Pending, hooks: int) -> Release:
        device = p.device
        began = time.perf_counter()
        before = device.snapshot()
        collected = p.collect and (before.allocated or 0) > p.baseline
        if collected:
            gc.collect()
        if p.empty_cache:
            device.empty_cache()
        after = device.snapshot() if (collected or p.empty_cache) else before
        ended = time.perf_counter()
        done = Release(
            device_name=device.describe()[0], reserved_before=before.reserved, reserved_after=after.reserved,
            allocated_before=before.allocated, allocated_after=after.allocated, collected=collected, hooks=hooks,
            seconds=ended - began, ended=ended,
        )
        logger.debug("deferred release on %s: %s", done.device_name, done)
        return done

    # -- for callers -----------------------------------------------------------------------------------------------

    def add_hook(self, hook: Callable[[], None]) -> Callable[[], None]:
        ref = weakref.WeakMethod(hook) if hasattr(hook, "__self__") and hasattr(hook, "__func__") else (lambda: hook)
        with self._state:
            self._hooks.append(ref)

        def remove() -> None:
            with self._state:
                if ref in self._hooks:
                    self._hooks.remove(ref)

        return remove

    def is_pending(self) -> bool:
        with self._state:
            return bool(self._pending)

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state:
            while self._pending or self._running.locked():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._state.wait(0.01 if left is None else min(left, 0.01))
            return True

    def close(self) -> None:
        """At exit: nothing new starts, and a release running ends first (a daemon thread stopped inside a CUDA
        call could leave the driver in a bad state)."""
        with self._state:
            self._closed = True
            self._due = None
            self._state.notify_all()
        with self._running:
            pass


_releaser = _Releaser()
atexit.register(_releaser.close)


def generation_started() -> None:
    """Mark a generation as started: a pending release waits for the next idle point, and a release already running
    ends before this returns. Pair every call with :func:`generation_ended`."""
    _releaser.generation_started()


def generation_ended(device: Device, baseline: int | None, used: bool, collect: bool = True,
                     empty_cache: bool = True) -> None:
    """Mark a generation as ended; when it ``used`` GPU memory on ``device``, a release becomes pending for it.

    Args:
        device: the device it ran on (a device without memory counters has nothing to release).
        baseline: bytes allocated before it started: a full collection runs only when more is allocated.
        used: it left cached or newly allocated GPU memory (False after an error, which cleaned up at once).
        collect: the release may run ``gc.collect()`` (the pipeline's ``gc_collect`` technique).
        empty_cache: the release clears the cache (its ``cuda_cache_clear`` technique).
    """
    _releaser.generation_ended(device, baseline, used, collect, empty_cache)


def request(device: Device, baseline: int | None, collect: bool = True, empty_cache: bool = True) -> None:
    """Ask for a release on ``device`` at the next idle point (the per-cell hook does, after a cell that touched the
    GPU); ``baseline``: bytes allocated before the work that asks for it."""
    _releaser.request(device, baseline, collect, empty_cache)


def cell_started() -> None:
    """A cell started: a generation that ends inside it leaves its release for the cell's end."""
    _releaser.cell_started()


def cell_ended() -> None:
    """A cell ended: a pending release runs :data:`CELL_DELAY` seconds later, in the background."""
    _releaser.cell_ended()


def pending() -> bool:
    """Whether a release is waiting for the next idle point."""
    return _releaser.is_pending()


def last_release() -> Release | None:
    """What the last release gave back (``None`` before the first)."""
    return _releaser.last


def release_now() -> list[Release]:
    """Run the pending release now, in this thread, unless a generation is running (then nothing runs). Returns
    what it did on each device."""
    return _releaser._run(None)


def wait_idle(timeout: float | None = None) -> bool:
    """Wait until no release is pending or running; False when ``timeout`` seconds passed first (a generation
    running, or a cell still open, keeps a release pending)."""
    return _releaser.wait_idle(timeout)


def add_idle_hook(hook: Callable[[], None]) -> Callable[[], None]:
    """Call ``hook()`` at the start of every release, before the cache is cleared: the place for code that keeps GPU
    buffers between generations (a weight streamer's kept slots) to drop them once the kernel is idle.

    The hook runs in the release's thread while no generation runs; it must not start a generation or wait for one.
    A bound method is held weakly (its object can still be collected); anything else strongly. An exception it
    raises is logged at debug level and the release goes on.

    Args:
        hook: a callable taking no argument.

    Returns:
        A callable that removes the hook.

    Example:
        ```python
        >>> from mlnb.monitor.release import add_idle_hook
        >>> remove = add_idle_hook(streamer.release)  # drop the kept slots when the kernel is idle
        >>> remove()
        ```
    """
    if not callable(hook):
        raise TypeError(f"hook must be callable, got {type(hook).__name__}")
    return _releaser.add_hook(hook)
