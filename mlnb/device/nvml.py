"""NVML through ``nvidia-ml-py``: device-wide memory (all processes) and the driver version.

Every NVML call of mlnb goes through :class:`Nvml`. It initialises lazily, once, on the first query, and answers
``None`` (N/A) with an error string instead of raising, so a missing library, a missing driver or a lost GPU never
breaks a display. All sizes are in bytes.
"""

from __future__ import annotations

import threading

__all__ = ["Nvml", "shared_nvml"]


class Nvml:
    """A lazily initialised NVML session whose queries never raise.

    Example:
        ```python
        >>> used, total, error = Nvml().memory(0)  # (None, None, "nvidia-ml-py is not installed") without it
        ```
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: str | None = None  # None: untried, "ok", or the error text
        self._mod = None
        self._handles: dict[int, object] = {}  # device handles, looked up once: the per-cell path reads memory

    def _init(self) -> bool:
        with self._lock:
            if self._state is None:
                try:
                    import pynvml  # provided by the nvidia-ml-py distribution

                    pynvml.nvmlInit()
                    self._mod = pynvml
                    self._state = "ok"
                except ImportError:
                    self._state = "nvidia-ml-py is not installed"
                except Exception as exc:  # no driver, no device, library missing
                    self._state = f"NVML unavailable: {exc}"
            return self._state == "ok"

    @property
    def error(self) -> str | None:
        """Why NVML is unavailable, or None once it initialised (or before it was tried)."""
        return None if self._state == "ok" else self._state

    def memory(self, index: int) -> tuple[int | None, int | None, str | None]:
        """``(used, total, error)`` for device ``index``; device-wide, in bytes.

        Args:
            index: the NVML device index.
        """
        if not self._init():
            return None, None, self._state
        try:
            handle = self._handles.get(index)
            if handle is None:
                handle = self._handles[index] = self._mod.nvmlDeviceGetHandleByIndex(index)
            mem = self._mod.nvmlDeviceGetMemoryInfo(handle)
            return int(mem.used), int(mem.total), None
        except Exception as exc:
            return None, None, f"NVML query failed: {exc}"

    def driver_version(self) -> str | None:
        """The driver's version string, or None."""
        if not self._init():
            return None
        try:
            version = self._mod.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else str(version)
        except Exception:
            return None


_shared = Nvml()


def shared_nvml() -> Nvml:
    """The process's NVML session, which every :class:`~mlnb.device.cuda.CudaDevice` uses unless given its own."""
    return _shared
