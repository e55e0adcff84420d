"""Copy streams: the small interface the weight streamer orders host-to-device copies with.

The streamer copies weights into device memory beside the compute and makes the compute wait for each copy, without
the host ever waiting for the GPU. That needs four primitives, and only the streamer needs them, so they are an
interface of their own instead of methods every :class:`~mlnb.device.Device` carries; a device hands out its
implementation from :meth:`~mlnb.device.Device.streams`.

:class:`CopyStreams` is the host's implementation (CPU and simulated devices): copies are synchronous and host
buffers are plain memory. The CUDA one (:class:`~mlnb.device.cuda.CudaCopyStreams`) copies on a side stream from
page-locked memory.
"""

from __future__ import annotations

__all__ = ["CopyStreams"]


class CopyStreams:
    """Host-to-device copies beside the compute, in order with it.

    Example:
        ```python
        >>> from mlnb.device import get_device
        >>> streams = get_device().streams()
        >>> handle = streams.issue_copy(streams.copy_stream(), dst, src)  # queued after the compute so far
        >>> streams.wait_copy(handle)  # the compute queued next reads dst only once the copy is in
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

    def issue_copy(self, stream, dst, src):
        """Copy the host tensor ``src`` into the device tensor ``dst`` once everything queued so far on the compute
        stream is done, on ``stream`` (from :meth:`copy_stream`) when given. Returns what :meth:`wait_copy` takes;
        here the copy is done on return and that is None.

        Args:
            stream: a copy stream, or None to copy in order on the compute stream.
            dst: the device tensor copied into.
            src: the host tensor copied from.
        """
        dst.copy_(src)

    def wait_copy(self, handle) -> None:
        """Make the compute stream wait for a copy from :meth:`issue_copy` (the host does not wait).

        Args:
            handle: what :meth:`issue_copy` returned.
        """
