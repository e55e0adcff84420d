"""``StepTimer``: the seconds of one denoising step and of the decode, read from the pipeline's step callback, and
the allocator's peak at the end of the denoising loop (before the VAE decodes).

Each mark synchronizes the device first, so a step's time is the GPU's time, not the time to queue its kernels.
The first step is left out (its interval also holds prompt encoding and first-call set-up); the decode is the time
from the last step's end to the pipeline's return (VAE decode and conversion to images).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

__all__ = ["StepTimer"]


class StepTimer:
    """Marks the end of each denoising step; reports the median step and the decode seconds.

    Args:
        synchronize: waits for the device (``Device.synchronize``).
        clock: seconds (``time.perf_counter``).
        peak: the allocator's peak allocated bytes (``Device.peak_allocated_bytes``), read at each mark; the last
            reading is the denoising loop's peak.

    Example:
        ```python
        >>> timer = StepTimer(device.synchronize)
        >>> pipe(prompt, callback_on_step_end=timer.callback())
        >>> timer.finish()
        >>> timer.step_seconds, timer.decode_seconds
        ```
    """

    def __init__(
        self,
        synchronize: Callable[[], None],
        clock: Callable[[], float] = time.perf_counter,
        peak: Callable[[], int | None] | None = None,
    ) -> None:
        self._sync = synchronize
        self._clock = clock
        self._peak = peak
        self.marks: list[float] = []
        self.end: float | None = None
        self.denoise_peak: int | None = None  # peak allocated bytes at the last step's end

    def mark(self) -> None:
        """Call at the end of every denoising step."""
        self._sync()
        self.marks.append(self._clock())
        if self._peak is not None:
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
        """Call when the pipeline has returned its images."""
        self._sync()
        self.end = self._clock()

    @property
    def step_seconds(self) -> float | None:
        """Median seconds of the steps after the first; ``None`` with fewer than two steps marked."""
        if len(self.marks) < 2:
            return None
        return statistics.median(b - a for a, b in zip(self.marks, self.marks[1:]))

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
        return self.end - self.marks[-1]
