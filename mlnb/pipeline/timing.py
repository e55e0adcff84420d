"""``StepTimer``: the seconds of one denoising step and of the decode, read from the pipeline's step callback, and
the allocator's peak at the end of the denoising loop (before the VAE decodes).

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

__all__ = ["StepTimer"]


class StepTimer:
    """Marks the end of each denoising step; reports the median step and the decode seconds.

    Args:
        synchronize: waits for the device (``Device.synchronize``), once, in :meth:`finish`.
        clock: makes a mark: seconds (``time.perf_counter``), or ``Device.timing_mark``.
        peak: the allocator's peak allocated bytes (``Device.peak_allocated_bytes``), read at each mark; the last
            reading is the denoising loop's peak.
        between: seconds between two marks (``Device.seconds_between``); the default subtracts them.

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
    ) -> None:
        self._sync = synchronize
        self._clock = clock
        self._between = between or (lambda start, end: end - start)
        self._peak = peak
        self.marks: list = []
        self.end = None
        self.denoise_peak: int | None = None  # peak allocated bytes at the last step's end

    @classmethod
    def on(cls, device) -> "StepTimer":
        """A timer of ``device``'s queue (CUDA events on a GPU), reading its allocator's peak at each mark."""
        return cls(device.synchronize, device.timing_mark, device.peak_allocated_bytes, device.seconds_between)

    def mark(self) -> None:
        """Call at the end of every denoising step (it does not wait for the device)."""
        self.marks.append(self._clock())
        if self._peak is not None:  # the allocator counts at allocation, as the host queues: no wait needed
            self.denoise_peak = self._peak()

    def callback(self, after_step: Callable[[int], None] | None = None):
        """A diffusers ``callback_on_step_end`` that marks each step, then calls ``after_step(step_index)``."""

        def on_step_end(pipe, step, timestep, callback_kwargs):
            self.mark()
            if after_step is not None:
                after_step(step)
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
    def decode_seconds(self) -> float | None:
        """Seconds from the last step's end to the return of the images; ``None`` until both are known."""
        if not self.marks or self.end is None:
            return None
        return self._between(self.marks[-1], self.end)
