"""The current device: detected once (CUDA when available, else the CPU), replaceable for tests and benchmarks."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Iterator

from .cuda import CudaDevice
from .interface import CpuDevice, Device

logger = logging.getLogger(__name__)

__all__ = ["get_device", "set_device", "use_device"]

_current: Device | None = None
_current_lock = threading.Lock()


def _detect() -> Device:
    if os.environ.get("MLNB_DEVICE", "").lower() == "cpu":
        return CpuDevice()
    try:
        import torch

        if torch.cuda.is_available():
            device = CudaDevice(torch.cuda.current_device())
            device.use_expandable_segments()  # before mlnb allocates anything: no cache flushes under a cap
            return device
    except Exception as exc:  # a broken CUDA install must not break a notebook
        logger.warning("CUDA probe failed (%s); using the CPU", exc)
    return CpuDevice()


def get_device() -> Device:
    """The device mlnb works on, detected once (``MLNB_DEVICE=cpu`` forces the CPU).

    Example:
        ```python
        >>> from mlnb.device import get_device
        >>> device = get_device()
        >>> device.is_cuda, device.info().name  # (False, 'CPU (no CUDA device)') without a CUDA device
        ```
    """
    global _current
    with _current_lock:
        if _current is None:
            _current = _detect()
        return _current


def set_device(device: Device | None) -> None:
    """Replace the current device.

    Args:
        device: the device to use from now on; ``None`` re-detects on next use.
    """
    global _current
    with _current_lock:
        _current = device


@contextlib.contextmanager
def use_device(device: Device) -> Iterator[Device]:
    """Use ``device`` inside the block, then restore the previous one.

    Args:
        device: the device for the block.

    Example:
        ```python
        >>> from mlnb.device import CpuDevice, use_device
        >>> with use_device(CpuDevice()) as dev:
        ...     dev.info().available
        False
        ```
    """
    global _current
    with _current_lock:
        previous = _current
        _current = device
    try:
        yield device
    finally:
        with _current_lock:
            _current = previous
