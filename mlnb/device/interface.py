"""The device interface: what the rest of mlnb may ask of an accelerator, and the CPU as its N/A case.

A :class:`Device` answers facts (:class:`DeviceInfo`, :class:`MemorySnapshot`) and runs cleanup. Queries never
raise: what is unknown is ``None`` (shown as ``N/A``). The copy-stream primitives that only the weight streamer needs
are a separate interface, :class:`~mlnb.device.streams.CopyStreams`, reached through :meth:`Device.streams`.

All sizes are in bytes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from .host import host_memory, host_rss
from .streams import CopyStreams

__all__ = ["DeviceInfo", "MemorySnapshot", "Device", "CpuDevice", "is_out_of_memory"]

CPU_NAME = "CPU (no CUDA device)"


@dataclass(frozen=True)
class DeviceInfo:
    """What is known about the accelerator and the host. ``None`` means not available (N/A)."""

    available: bool  # a CUDA device is usable for compute
    name: str
    kind: str  # "cuda", "cpu" or "fake"
    index: int | None = None
    total_bytes: int | None = None  # torch.cuda.mem_get_info total
    free_bytes: int | None = None  # torch.cuda.mem_get_info free (device-wide)
    nvml_used_bytes: int | None = None  # NVML device-wide used, all processes
    nvml_total_bytes: int | None = None
    allocated_bytes: int | None = None  # torch caching allocator, this process
    reserved_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    compute_capability: tuple[int, int] | None = None
    supports_bf16: bool = False
    supports_fp8: bool = False  # fp8 *storage* (layerwise casting); compute stays fp16/bf16
    driver_version: str | None = None
    cuda_version: str | None = None
    host_total_bytes: int | None = None
    host_available_bytes: int | None = None
    nvml_error: str | None = None

    @property
    def native_bf16(self) -> bool:
        """Whether the card computes bf16 in hardware (compute capability 8.0 and up: the Ampere
        generation and later). ``supports_bf16`` is also true on a T4, where torch emulates it slowly."""
        return self.compute_capability is not None and tuple(self.compute_capability) >= (8, 0)


@dataclass(frozen=True)
class MemorySnapshot:
    """Memory counters at one instant. GPU fields are ``None`` without a GPU."""

    time: float  # time.perf_counter()
    allocated: int | None = None
    reserved: int | None = None
    peak_allocated: int | None = None  # since the last reset_peak()
    peak_reserved: int | None = None
    device_used: int | None = None  # NVML device-wide used
    host_rss: int | None = None


def is_out_of_memory(exc: BaseException) -> bool:
    """True if ``exc`` is an accelerator out-of-memory error: torch's ``OutOfMemoryError`` (or a subclass), or the
    plain ``RuntimeError`` some kernels raise with the allocator's message.

    Args:
        exc: the exception to classify.
    """
    torch = sys.modules.get("torch")  # an OOM from torch means torch is imported: never import it here
    oom_type = None
    if torch is not None:
        cuda = getattr(torch, "cuda", None)
        oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    # Some kernels (cuDNN, cuBLAS) raise a plain RuntimeError on allocation failure.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class Device:
    """Interface every device implements. The base answers as the CPU does: the NA case."""

    kind = "cpu"
    is_cuda = False  # compute runs on CUDA (offloads have somewhere to onload to)
    has_memory_counters = False  # allocated/reserved/peak are meaningful

    @property
    def torch_device(self) -> str:
        return "cpu"

    def info(self) -> DeviceInfo:
        total, available = host_memory()
        return DeviceInfo(
            available=False,
            name=CPU_NAME,
            kind=self.kind,
            host_total_bytes=total,
            host_available_bytes=available,
        )

    def snapshot(self) -> MemorySnapshot:
        return MemorySnapshot(time=time.perf_counter(), host_rss=host_rss())

    def counters(self) -> MemorySnapshot:
        """The allocator's counters alone (allocated, reserved and their peaks), cheaply: no NVML, no host RSS, so
        that a per-cell check costs little. Here the time alone."""
        return MemorySnapshot(time=time.perf_counter())

    def reset_peak(self) -> None:
        """Reset the allocator's peak counters (one global counter per device in torch)."""

    def peak_allocated_bytes(self) -> int | None:
        """The allocator's peak allocated bytes since the last :meth:`reset_peak`, cheaply (no NVML, no host RSS)."""
        return None

    def peak_reserved_bytes(self) -> int | None:
        """The allocator's peak reserved bytes since the last :meth:`reset_peak`, cheaply."""
        return None

    def synchronize(self) -> None:
        """Wait for queued kernels."""

    def timing_mark(self):
        """A mark of how far the compute stream has come, without waiting for it: on CUDA an event recorded on the
        current stream, here the host clock (the work queued so far is already done). :meth:`seconds_between` reads
        two of them once the device is synchronized."""
        return time.perf_counter()

    def seconds_between(self, start, end) -> float:
        """Seconds from mark ``start`` to mark ``end`` (from :meth:`timing_mark`; on CUDA, after
        :meth:`synchronize`)."""
        return end - start

    def empty_cache(self) -> bool:
        """Return cached allocator blocks to the driver. Returns False where there is nothing to clear."""
        return False

    def is_oom(self, exc: BaseException) -> bool:
        """True if ``exc`` is an accelerator out-of-memory error (:func:`is_out_of_memory`).

        Args:
            exc: the exception to classify.
        """
        return is_out_of_memory(exc)

    def owns_tensor(self, tensor) -> bool:
        """True if ``tensor`` lives in this device's memory (it pins VRAM while referenced)."""
        return False

    def free_bytes(self) -> int | None:
        """Free device memory in bytes, device-wide (None without a GPU)."""
        return None

    def describe(self) -> tuple[str, int | None]:
        """``(name, total bytes)``, cheaply: the per-cell report needs only these, not a full :meth:`info`."""
        info = self.info()
        return info.name, info.total_bytes

    def set_memory_cap(self, cap_bytes: int | None) -> None:
        """Cap this process's allocations (simulates a smaller card); ``None`` lifts the cap.

        Args:
            cap_bytes: the cap in bytes, or None to lift it.
        """
        raise RuntimeError("a memory cap needs a CUDA device")

    def h2d_bandwidth(self, nbytes: int = 256 * 2**20, repeats: int = 5) -> float | None:
        """Pinned host-to-device copy bandwidth in bytes/s, or None without a GPU.

        Args:
            nbytes: bytes per copy.
            repeats: copies timed.
        """
        return None

    def device_used_bytes(self) -> int | None:
        """Device-wide used memory (NVML, all processes) in bytes; cheap enough to sample in a thread."""
        return None

    def allocator_counters(self) -> dict[str, int]:
        """Cumulative counts of the caching allocator's expensive events (CUDA): allocations that had to free the
        cache and retry, device mallocs and frees, and synchronisations of every stream. Empty here."""
        return {}

    def expandable_segments(self) -> bool | None:
        """Whether the caching allocator grows its segments in place (CUDA's ``expandable_segments``), so that under
        a cap it maps more memory instead of freeing its cache and retrying; None where there is no such allocator."""
        return None

    def use_expandable_segments(self) -> bool:
        """Turn expandable segments on where the allocator supports them and the user has not chosen; returns
        whether they are on (False here)."""
        return False

    def streams(self) -> CopyStreams:
        """The host-to-device copy primitives the weight streamer orders its copies with: synchronous copies from
        plain host memory here, a copy stream and page-locked memory on CUDA."""
        return CopyStreams()


class CpuDevice(Device):
    """No CUDA device: GPU fields are N/A, cleanup on the GPU is a no-op."""

    def describe(self) -> tuple[str, int | None]:
        # Read after every cell: the name is fixed and there is no device total, so the host's RAM is not read.
        return CPU_NAME, None
