"""The one module that touches ``torch.cuda`` and NVML.

Everything above this layer asks a :class:`Device` for facts and for cleanup. Queries never raise: a missing GPU,
a missing ``nvidia-ml-py`` or an NVML call that fails gives ``None`` (shown as ``N/A``) and ``available=False`` or
an ``nvml_error`` string. Tests swap in a :class:`FakeDevice` with :func:`use_device`.

All sizes are in bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator

logger = logging.getLogger(__name__)

__all__ = [
    "DeviceInfo",
    "MemorySnapshot",
    "Device",
    "CpuDevice",
    "CudaDevice",
    "FakeDevice",
    "FakeOutOfMemoryError",
    "get_device",
    "set_device",
    "use_device",
    "host_memory",
    "host_rss",
]


# ----------------------------------------------------------------------------------------------------------------
# Facts


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
        """Whether the card computes bf16 in hardware (compute capability 8.0 and up: A100, H100, L4, RTX 30xx and
        later). ``supports_bf16`` is also true on a T4, where torch emulates it slowly."""
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


def host_memory() -> tuple[int | None, int | None]:
    """Host RAM ``(total, available)`` in bytes, or ``(None, None)``."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except Exception:  # psutil missing or failing: NA, never raise
        return None, None


def host_rss() -> int | None:
    """This process's resident set size in bytes."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return None


def host_peak_rss() -> int | None:
    """The process's lifetime peak RSS in bytes (``ru_maxrss``), or ``None``."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------------------------
# NVML, initialised lazily and once


class _Nvml:
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
        return None if self._state == "ok" else self._state

    def memory(self, index: int) -> tuple[int | None, int | None, str | None]:
        """``(used, total, error)`` for device ``index``; device-wide, in bytes."""
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
        if not self._init():
            return None
        try:
            version = self._mod.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else str(version)
        except Exception:
            return None


_nvml = _Nvml()


# ----------------------------------------------------------------------------------------------------------------
# Devices


class Device:
    """Interface every device implements. The CPU device is the NA case."""

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
            name="CPU (no CUDA device)",
            kind=self.kind,
            host_total_bytes=total,
            host_available_bytes=available,
        )

    def snapshot(self) -> MemorySnapshot:
        return MemorySnapshot(time=time.perf_counter(), host_rss=host_rss())

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
        """True if ``exc`` is an accelerator out-of-memory error."""
        return isinstance(exc, FakeOutOfMemoryError) or _is_torch_oom(exc)

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
        """Cap this process's allocations (simulates a smaller card); ``None`` lifts the cap."""
        raise RuntimeError("a memory cap needs a CUDA device")

    def h2d_bandwidth(self, nbytes: int = 256 * 2**20, repeats: int = 5) -> float | None:
        """Pinned host-to-device copy bandwidth in bytes/s, or None without a GPU."""
        return None

    def device_used_bytes(self) -> int | None:
        """Device-wide used memory (NVML, all processes) in bytes; cheap enough to sample in a thread."""
        return None

    def copy_stream(self):
        """A new stream for host-to-device copies beside the compute stream, or None where there is none."""
        return None

    def host_buffer(self, nbytes: int):
        """``nbytes`` of host memory (a uint8 tensor) that copies to this device can read asynchronously: page-locked
        on CUDA, plain memory here."""
        import torch

        return torch.empty(nbytes, dtype=torch.uint8)

    def allocator_counters(self) -> dict[str, int]:
        """Cumulative counts of the caching allocator's expensive events (CUDA): allocations that had to free the
        cache and retry, device mallocs and frees, and synchronisations of every stream. Empty here."""
        return {}

    def issue_copy(self, stream, dst, src):
        """Copy the host tensor ``src`` into the device tensor ``dst`` once everything queued so far on the compute
        stream is done, on ``stream`` (from :meth:`copy_stream`) when given. Returns what :meth:`wait_copy` takes;
        here the copy is done on return and that is None."""
        dst.copy_(src)

    def wait_copy(self, handle) -> None:
        """Make the compute stream wait for a copy from :meth:`issue_copy` (the host does not wait)."""


_ALLOCATOR_COUNTERS = (
    "num_alloc_retries", "num_oom_rejections", "num_device_alloc", "num_device_free", "num_sync_all_streams",
)


def _is_torch_oom(exc: BaseException) -> bool:
    oom_type = None
    try:
        import sys

        torch = sys.modules.get("torch")
        if torch is not None:
            oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    except Exception:
        oom_type = None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    # Some kernels (cuDNN, cuBLAS) raise a plain RuntimeError on allocation failure.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class CpuDevice(Device):
    """No CUDA device: GPU fields are N/A, cleanup on the GPU is a no-op."""


class CudaDevice(Device):
    """A CUDA device through ``torch.cuda`` and NVML."""

    kind = "cuda"
    is_cuda = True
    has_memory_counters = True

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self._cap: int | None = None  # bytes, from set_memory_cap; free/total figures honour it
        self._described: tuple[str, int] | None = None

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.index}"

    def owns_tensor(self, tensor) -> bool:
        return bool(getattr(tensor, "is_cuda", False))

    @staticmethod
    def _cuda():
        import torch

        return torch.cuda

    def describe(self) -> tuple[str, int | None]:
        # Name and total never change for a device; the cap is applied on top. Cached: this runs after every cell.
        if self._described is None:
            cuda = self._cuda()
            try:
                name = cuda.get_device_name(self.index)
                total = int(cuda.mem_get_info(self.index)[1])
            except Exception:
                return f"cuda:{self.index}", None
            self._described = (name, total)
        name, total = self._described
        return name, total if self._cap is None else min(total, self._cap)

    def _capped(self, free: int | None, total: int | None) -> tuple[int | None, int | None]:
        # Under a memory cap the process sees a smaller card: mem_get_info alone would still show the real one.
        if self._cap is None:
            return free, total
        try:
            reserved = int(self._cuda().memory_reserved(self.index))
        except Exception:
            reserved = 0
        left = max(0, self._cap - reserved)
        return (left if free is None else min(int(free), left)), (self._cap if total is None else min(int(total), self._cap))

    def free_bytes(self) -> int | None:
        try:
            free, total = self._cuda().mem_get_info(self.index)
        except Exception:
            return None
        return self._capped(int(free), int(total))[0]

    def device_used_bytes(self) -> int | None:
        return _nvml.memory(self.index)[0]

    def info(self) -> DeviceInfo:
        cuda = self._cuda()
        host_total, host_available = host_memory()
        try:
            free, total = self._capped(*cuda.mem_get_info(self.index))
        except Exception:
            free = total = None
        try:
            capability = tuple(cuda.get_device_capability(self.index))
        except Exception:
            capability = None
        try:
            name = cuda.get_device_name(self.index)
        except Exception:
            name = f"cuda:{self.index}"
        try:
            bf16 = bool(cuda.is_bf16_supported())
        except Exception:
            bf16 = False
        used, nvml_total, nvml_error = _nvml.memory(self.index)
        try:
            import torch

            cuda_version = torch.version.cuda
        except Exception:
            cuda_version = None
        return DeviceInfo(
            available=True,
            name=name,
            kind="cuda",
            index=self.index,
            total_bytes=None if total is None else int(total),
            free_bytes=None if free is None else int(free),
            nvml_used_bytes=used,
            nvml_total_bytes=nvml_total,
            allocated_bytes=int(cuda.memory_allocated(self.index)),
            reserved_bytes=int(cuda.memory_reserved(self.index)),
            peak_allocated_bytes=int(cuda.max_memory_allocated(self.index)),
            compute_capability=capability,  # type: ignore[arg-type]
            supports_bf16=bf16,
            # fp8 storage only needs the dtype to exist: weights are upcast before compute.
            supports_fp8=_has_fp8_dtype(),
            driver_version=_nvml.driver_version(),
            cuda_version=cuda_version,
            host_total_bytes=host_total,
            host_available_bytes=host_available,
            nvml_error=nvml_error,
        )

    def snapshot(self) -> MemorySnapshot:
        cuda = self._cuda()
        used, _, _ = _nvml.memory(self.index)
        return MemorySnapshot(
            time=time.perf_counter(),
            allocated=int(cuda.memory_allocated(self.index)),
            reserved=int(cuda.memory_reserved(self.index)),
            peak_allocated=int(cuda.max_memory_allocated(self.index)),
            peak_reserved=int(cuda.max_memory_reserved(self.index)),
            device_used=used,
            host_rss=host_rss(),
        )

    def reset_peak(self) -> None:
        self._cuda().reset_peak_memory_stats(self.index)

    def peak_allocated_bytes(self) -> int | None:
        return int(self._cuda().max_memory_allocated(self.index))

    def peak_reserved_bytes(self) -> int | None:
        return int(self._cuda().max_memory_reserved(self.index))

    def synchronize(self) -> None:
        self._cuda().synchronize(self.index)

    def timing_mark(self):
        event = self._cuda().Event(enable_timing=True)
        event.record()
        return event

    def seconds_between(self, start, end) -> float:
        return start.elapsed_time(end) / 1000.0

    def empty_cache(self) -> bool:
        cuda = self._cuda()
        cuda.synchronize(self.index)
        cuda.empty_cache()
        cuda.ipc_collect()
        return True

    def set_memory_cap(self, cap_bytes: int | None) -> None:
        cuda = self._cuda()
        _, total = cuda.mem_get_info(self.index)
        fraction = 1.0 if cap_bytes is None else min(1.0, cap_bytes / total)
        cuda.set_per_process_memory_fraction(fraction, self.index)
        self._cap = None if cap_bytes is None else min(int(cap_bytes), int(total))

    def copy_stream(self):
        return self._cuda().Stream(self.index)

    def host_buffer(self, nbytes: int):
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def allocator_counters(self) -> dict[str, int]:
        stats = self._cuda().memory_stats(self.index)
        return {key: int(stats.get(key, 0)) for key in _ALLOCATOR_COUNTERS}

    def issue_copy(self, stream, dst, src):
        cuda = self._cuda()
        if stream is None:  # in order on the compute stream itself
            dst.copy_(src, non_blocking=src.is_pinned())
            return None
        stream.wait_stream(cuda.current_stream(self.index))  # dst may still be read by queued kernels
        with cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        return stream.record_event()

    def wait_copy(self, handle) -> None:
        if handle is not None:
            self._cuda().current_stream(self.index).wait_event(handle)

    def h2d_bandwidth(self, nbytes: int = 256 * 2**20, repeats: int = 5) -> float | None:
        import torch

        cuda = self._cuda()
        host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        dev = torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device)
        dev.copy_(host, non_blocking=True)  # warm-up
        cuda.synchronize(self.index)
        start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dev.copy_(host, non_blocking=True)
        end.record()
        cuda.synchronize(self.index)
        seconds = start.elapsed_time(end) / 1000.0
        del host, dev
        return nbytes * repeats / seconds if seconds > 0 else None


def _has_fp8_dtype() -> bool:
    try:
        import torch

        return hasattr(torch, "float8_e4m3fn")
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------------------------
# The current device

_current: Device | None = None
_current_lock = threading.Lock()


def _detect() -> Device:
    if os.environ.get("MLNB_DEVICE", "").lower() == "cpu":
        return CpuDevice()
    try:
        import torch

        if torch.cuda.is_available():
            return CudaDevice(torch.cuda.current_device())
    except Exception as exc:  # a broken CUDA install must not break a notebook
        logger.warning("CUDA probe failed (%s); using the CPU", exc)
    return CpuDevice()


def get_device() -> Device:
    """The device mlnb works on, detected once (``MLNB_DEVICE=cpu`` forces the CPU)."""
    global _current
    with _current_lock:
        if _current is None:
            _current = _detect()
        return _current


def set_device(device: Device | None) -> None:
    """Replace the current device (``None`` re-detects on next use)."""
    global _current
    with _current_lock:
        _current = device


@contextlib.contextmanager
def use_device(device: Device) -> Iterator[Device]:
    """Use ``device`` inside the block, then restore the previous one."""
    global _current
    with _current_lock:
        previous = _current
        _current = device
    try:
        yield device
    finally:
        with _current_lock:
            _current = previous


# The simulated GPU lives in its own module; it is re-exported here, where callers look for devices.
from .fake_device import FakeDevice, FakeOutOfMemoryError  # noqa: E402
