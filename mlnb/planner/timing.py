"""``StepTimer``: the seconds of one denoising step and of the decode, read from the pipeline's step callback, and
the allocator's peak at the end of the denoising loop (before the VAE decodes). ``BlockTimer``: where each denoiser
block ran in one forward, on the GPU, and how long a forward takes the host to issue.

A mark is a point in the device's queue (:meth:`mlnb.device.Device.timing_mark`: a CUDA event), so a step's time is
the GPU's time, not the time to queue its kernels, and nothing waits for the GPU until the images are back. A
synchronize at every step would drain the queue each time: the GPU would idle while the host queued the next step's
first kernels, and a streamed plan's first copies of the next step, issued as a step ends, could no longer arrive
behind the scheduler's work and the next step's resident blocks. The first step is left out (its interval also
holds prompt encoding and first-call set-up); the decode is the time from the last step's end to the pipeline's
return (VAE decode and conversion to images).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

__all__ = ["BlockTimer", "StepTimer", "cache_was_empty"]

_EMPTY_CACHE = 64 * 2**20  # bytes reserved beyond those allocated that still count as an empty allocator cache


def cache_was_empty(allocated: int | None, reserved: int | None) -> bool:
    """Whether the allocator held next to nothing beyond what was allocated (at a generation's start): only then do
    its reserved bytes over the loop measure the loop's own fragmentation (cached blocks would count as it too)."""
    if allocated is None or reserved is None:
        return False
    return reserved - allocated <= _EMPTY_CACHE


class StepTimer:
    """Marks the end of each denoising step; reports the median step and the decode seconds.

    Args:
        synchronize: waits for the device (``Device.synchronize``), once, in :meth:`finish`.
        clock: makes a mark: seconds (``time.perf_counter``), or ``Device.timing_mark``.
        peak: the allocator's peak allocated bytes (``Device.peak_allocated_bytes``), read at each mark; the last
            reading is the denoising loop's peak.
        between: seconds between two marks (``Device.seconds_between``); the default subtracts them.
        reserved: the allocator's peak reserved bytes (``Device.peak_reserved_bytes``), read at each mark.

    Example:
        ```python
        >>> timer = StepTimer.on(device)
        >>> pipe(prompt, callback_on_step_end=timer.callback())
        >>> timer.finish()
        >>> timer.step_seconds, timer.decode_seconds
        ```
    """

    def __init__(
        self,
        synchronize: Callable[[], None],
        clock: Callable[[], object] = time.perf_counter,
        peak: Callable[[], int | None] | None = None,
        between: Callable[[object, object], float] | None = None,
        reserved: Callable[[], int | None] | None = None,
    ) -> None:
        self._sync = synchronize
        self._clock = clock
        self._between = between or (lambda start, end: end - start)
        self._peak = peak
        self._reserved = reserved
        self.denoise_reserved: int | None = None  # peak reserved bytes at the last step's end
        self.marks: list = []
        self.start = None  # a mark as the pipeline call starts (begin)
        self.end = None
        self.denoise_peak: int | None = None  # peak allocated bytes at the last step's end

    @classmethod
    def on(cls, device) -> "StepTimer":
        """A timer of ``device``'s queue (CUDA events on a GPU), reading its allocator's peak at each mark."""
        return cls(device.synchronize, device.timing_mark, device.peak_allocated_bytes, device.seconds_between,
                   device.peak_reserved_bytes)

    def begin(self) -> None:
        """Call as the pipeline call starts: the first step's interval then holds the prompt encoding."""
        self.start = self._clock()

    def mark(self) -> None:
        """Call at the end of every denoising step (it does not wait for the device)."""
        self.marks.append(self._clock())
        if self._peak is not None:  # the allocator counts at allocation, as the host queues: no wait needed
            self.denoise_peak = self._peak()
        if self._reserved is not None:
            self.denoise_reserved = self._reserved()

    def callback(self, after_step: Callable[[int], None] | None = None, then=None):
        """A diffusers ``callback_on_step_end`` that marks each step, calls ``after_step(step_index)``, then the
        user's own callback ``then`` (same signature), whose returned tensors the pipeline uses."""

        def on_step_end(pipe, step, timestep, callback_kwargs):
            self.mark()
            if after_step is not None:
                after_step(step)
            if then is not None:
                return then(pipe, step, timestep, callback_kwargs)
            return callback_kwargs

        return on_step_end

    def finish(self) -> None:
        """Call when the pipeline has returned its images: the last mark, then the one wait for the device."""
        self.end = self._clock()
        self._sync()

    @property
    def step_seconds(self) -> float | None:
        """Median seconds of the steps after the first; ``None`` with fewer than two steps marked."""
        if len(self.marks) < 2:
            return None
        return statistics.median(self._between(a, b) for a, b in zip(self.marks, self.marks[1:]))

    def reserves(self, start_allocated: int | None, final_peak: int | None) -> tuple[int | None, int | None]:
        """Activation bytes above ``start_allocated`` (the resident weights): ``(denoising loop, decode)``.

        The decode's figure is known only when it set a new peak after the last step (``None`` otherwise: it needed
        less than the loop). Both are ``None`` without peak readings.
        """
        if start_allocated is None or self.denoise_peak is None:
            return None, None
        denoise = self.denoise_peak - start_allocated
        decode = final_peak - start_allocated if final_peak is not None and final_peak > self.denoise_peak else None
        return (denoise if denoise > 0 else None), decode

    @property
    def first_seconds(self) -> float | None:
        """Seconds from :meth:`begin` to the end of the first step: the prompt encoding, the first step and what
        the pipeline does before it; ``None`` without both marks."""
        if self.start is None or not self.marks:
            return None
        return self._between(self.start, self.marks[0])

    @property
    def fragmentation(self) -> int | None:
        """Bytes the allocator reserved above its allocated peak over the denoising loop (None without readings)."""
        if self.denoise_reserved is None or self.denoise_peak is None:
            return None
        return max(0, self.denoise_reserved - self.denoise_peak)

    @property
    def decode_seconds(self) -> float | None:
        """Seconds from the last step's end to the return of the images; ``None`` until both are known."""
        if not self.marks or self.end is None:
            return None
        return self._between(self.marks[-1], self.end)


class BlockTimer:
    """Marks where each block of the denoiser starts and ends in one forward, for the planner's schedule of copies,
    and times on the host how long each forward takes to issue.

    Hooks on the denoiser and on each block record a mark (:meth:`mlnb.device.Device.timing_mark`) as they start and
    end during the ``forward``-th forward of a generation (the second by default: the first also sets up kernels),
    and only then. With the denoiser's streamer, a streamed block is also marked once its copy has been waited for,
    so the timeline holds compute only: each wait is taken out, and the blocks after it move earlier by as much
    (:attr:`stall_seconds` is what the waits added up to). Use it as a context manager around the pipeline call;
    :meth:`timeline` reads the marks once the device is synchronized (after :meth:`StepTimer.finish`).

    The host side: the denoiser's hooks also read the host clock as each forward starts and ends. Nothing waits for
    the GPU in between, so on CUDA that is the host's time to issue the forward (its kernels launched, a streamer's
    hooks run), which bounds a launch-bound step from below however fast the GPU is. :attr:`host_forward_seconds`
    is the median over the forwards after the first, leaving out the one marked block by block (its marks are host
    work too). With ``blocks=None`` only that is timed (two hooks, no marks).

    Args:
        device: the mlnb device whose marks are read.
        denoiser: the UNet or transformer.
        blocks: its blocks by name (:func:`mlnb.planner.blocks.denoiser_blocks`), or None to time the host alone.
        forward: which forward to time, counted from 0.
        streamer: the denoiser's :class:`~mlnb.planner.streaming.UnitStreamer`, when a plan streams blocks.
        clock: the host clock (``time.perf_counter``).

    Example:
        ```python
        >>> with BlockTimer(device, pipe.unet, denoiser_blocks(pipe)) as blocks:
        ...     pipe(prompt, callback_on_step_end=timer.callback())
        >>> timer.finish()
        >>> blocks.timeline()  # (forward seconds, ((name, start, seconds), ...)) in the order they ran
        >>> blocks.host_forward_seconds  # the host's time to issue one forward
        ```
    """

    def __init__(self, device, denoiser, blocks: dict | None, forward: int = 1, streamer=None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.device, self.denoiser, self.blocks, self.forward = device, denoiser, blocks, forward
        self.streamer = streamer if blocks is not None else None
        self.stall_seconds: float | None = None  # set by timeline()
        self._clock = clock
        self._count = 0
        self._active = False
        self._marks: list[tuple[str, str, object]] = []  # (name, "start" | "ready" | "end", mark); "" is the forward
        self._handles: list = []
        self._host_start: float | None = None
        self._host: list[float] = []  # host seconds of each forward timed on the host

    @property
    def host_forward_seconds(self) -> float | None:
        """Median host seconds to issue one forward, over the forwards after the first but the one marked block by
        block; None with none of those (fewer than three forwards, with blocks)."""
        return statistics.median(self._host) if self._host else None

    def __enter__(self) -> "BlockTimer":
        self._handles = [
            self.denoiser.register_forward_pre_hook(self._forward_starts),
            self.denoiser.register_forward_hook(self._forward_ends),
        ]
        for name, module in (self.blocks or {}).items():
            self._handles.append(module.register_forward_pre_hook(lambda m, a, _n=name: self._mark(_n, "start")))
            self._handles.append(module.register_forward_hook(lambda m, a, o, _n=name: self._mark(_n, "end")))
        if self.streamer is not None:
            self.streamer.on_ready = lambda name: self._mark(name, "ready")
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.streamer is not None:
            self.streamer.on_ready = None
        self._active = False
        return False

    def _forward_starts(self, module, args) -> None:
        self._active = self.blocks is not None and self._count == self.forward
        # the first forward sets up kernels; the marked one issues marks as well
        self._host_start = None if self._count == 0 or self._active else self._clock()
        self._count += 1
        if self._active:
            self._marks = [("", "start", self.device.timing_mark())]

    def _forward_ends(self, module, args, output) -> None:
        if self._host_start is not None:
            self._host.append(self._clock() - self._host_start)
            self._host_start = None
        if self._active:
            self._marks.append(("", "end", self.device.timing_mark()))
            self._active = False

    def _mark(self, name: str, edge: str) -> None:
        if self._active:
            self._marks.append((name, edge, self.device.timing_mark()))

    def timeline(self) -> tuple[float, tuple[tuple[str, float, float], ...]] | None:
        """``(forward seconds, ((block, start, seconds), ...))`` of compute, starts counted from the forward's start,
        in the order the blocks ran; ``None`` if the forward was not timed whole or a block ran twice or not at
        all."""
        marks = self._marks
        if self.blocks is None or len(marks) < 2 or marks[0][:2] != ("", "start") or marks[-1][:2] != ("", "end"):
            return None
        found: dict[str, dict[str, object]] = {}
        for name, edge, mark in marks[1:-1]:
            edges = found.setdefault(name, {})
            if edge in edges or (edge != "start" and "start" not in edges) or (edge == "ready" and "end" in edges):
                return None  # ran twice, or out of order
            edges[edge] = mark
        if set(found) != set(self.blocks) or any("end" not in edges for edges in found.values()):
            return None
        between = self.device.seconds_between
        origin = marks[0][2]
        stalled = 0.0
        rows = []
        for name, edges in found.items():  # in the order they started
            start = between(origin, edges["start"]) - stalled
            ready = edges.get("ready", edges["start"])
            stall = between(edges["start"], ready)
            stalled += stall
            rows.append((name, start, between(ready, edges["end"])))
        self.stall_seconds = stalled
        return between(origin, marks[-1][2]) - stalled, tuple(rows)
