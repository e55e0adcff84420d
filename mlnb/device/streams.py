"""Copy streams: the small interface the weight streamer orders host-to-device copies with.

The streamer copies weights into device memory beside the compute and makes the compute wait for each copy, without
the host ever waiting for the GPU. Only the streamer needs these primitives, so they are an interface of their own
instead of methods every :class:`~mlnb.device.Device` carries; a device hands out its implementation from
:meth:`~mlnb.device.Device.streams`.

Events are made once (:meth:`CopyStreams.new_event`) and recorded again for every copy or compute they mark: a
streamed unit has one for its copy and one for its compute, reused at every step, so the host makes none per step.

:class:`CopyStreams` is the host's implementation (CPU and simulated devices): copies are synchronous, host buffers are
plain memory and events are None. The CUDA one (:class:`~mlnb.device.cuda.CudaCopyStreams`) copies on a side stream
from page-locked memory.
"""

from __future__ import annotations

__all__ = ["CopyStreams"]


class CopyStreams:
    """Host-to-device copies beside the compute, in order with it.

    Example:
        ```python
        >>> from mlnb.device import get_device
        >>> streams = get_device().streams()
        >>> stream, arrived, computed = streams.copy_stream(), streams.new_event(), streams.new_event()
        >>> streams.issue_copy(stream, dst, src, done=arrived)  # queued after the compute so far
        >>> streams.wait_copy(arrived)  # the compute queued next reads dst only once the copy is in
        >>> streams.mark_done(computed)  # ... kernels reading dst, then:
        >>> streams.issue_copy(stream, dst, other, after=computed, done=arrived)  # dst refilled once they are done
        ```
    """

    def copy_stream(self):
        """A new stream for host-to-device copies beside the compute stream, or None where there is none."""
        return None

    def host_buffer(self, nbytes: int):
        """``nbytes`` of host memory (a uint8 tensor) that copies to the device can read asynchronously: page-locked
        on CUDA, plain memory here.

        Args:
            nbytes: the buffer's size in bytes.
        """
        import torch

        return torch.empty(nbytes, dtype=torch.uint8)

    def device_buffer(self, nbytes: int, device):
        """``nbytes`` of device memory (a uint8 tensor on ``device``) for copies to land in: the streamer's ring.

        Args:
            nbytes: the buffer's size in bytes.
            device: where (a ``torch.device``).
        """
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def new_event(self):
        """An event to mark copies or compute with, made once and recorded again each time (None here: copies are
        done when issued)."""
        return None

    def mark_done(self, event) -> None:
        """Record ``event`` on the compute stream: it completes once the compute queued so far is done. A copy given
        it as ``after`` waits for that compute, and no more.

        Args:
            event: from :meth:`new_event`.
        """

    def issue_copy(self, stream, dst, src, after=None, done=None):
        """Copy the host tensor ``src`` into the device tensor ``dst`` on ``stream`` (from :meth:`copy_stream`) when
        given, once the compute ``after`` marks is done, or without ``after`` once everything queued so far on the
        compute stream is. Returns what :meth:`wait_copy` takes: ``done`` recorded after the copy when given (no new
        event), else a new one; here the copy is done on return and that is ``done`` (None by default).

        Args:
            stream: a copy stream, or None to copy in order on the compute stream.
            dst: the device tensor copied into.
            src: the host tensor copied from.
            after: an event from :meth:`mark_done`: the compute that last read ``dst``.
            done: an event from :meth:`new_event` to record once the copy is in.
        """
        dst.copy_(src)
        return done

    def wait_copy(self, handle) -> None:
        """Make the compute stream wait for a copy from :meth:`issue_copy` (the host does not wait).

        Args:
            handle: what :meth:`issue_copy` returned.
        """
