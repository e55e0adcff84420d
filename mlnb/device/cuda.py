"""The CUDA device, through ``torch.cuda`` for this process's allocator and NVML for the whole card.

Every query answers ``None`` where torch or NVML cannot; only the cleanup and copy calls of a working device reach
the driver. All sizes are in bytes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

from .host import host_memory, host_rss
from .interface import Device, DeviceInfo, MemorySnapshot
from .nvml import Nvml, shared_nvml
from .streams import CopyStreams

logger = logging.getLogger(__name__)

__all__ = ["CudaDevice", "CudaCopyStreams"]

_ALLOC_CONF = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
_ALLOCATOR_COUNTERS = (
    "num_alloc_retries", "num_oom_rejections", "num_device_alloc", "num_device_free", "num_sync_all_streams",
)


def _allocator_settings() -> str:
    """The caching allocator's settings as torch reports them (``expandable_segments:True,...``); where this torch
    cannot report them, what the environment asked for."""
    import torch

    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if getter is not None:
        return str(getter())
    return ",".join(os.environ.get(name, "") for name in _ALLOC_CONF)


def _torch_cuda():
    import torch

    return torch.cuda


class CudaDevice(Device):
    """A CUDA device through ``torch.cuda`` and NVML.

    Args:
        index: the CUDA device index.
        nvml: the NVML session to read device-wide memory from (default: the process's shared one).
    """

    kind = "cuda"
    is_cuda = True
    has_memory_counters = True

    def __init__(self, index: int = 0, nvml: Nvml | None = None) -> None:
        self.index = index
        self._nvml = nvml if nvml is not None else shared_nvml()
        self._cap: int | None = None  # bytes, from set_memory_cap; free/total figures honour it
        self._described: tuple[str, int] | None = None
        self._streams: CudaCopyStreams | None = None
        self._expandable: bool | None = None  # set once use_expandable_segments has turned them on

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.index}"

    def owns_tensor(self, tensor) -> bool:
        return bool(getattr(tensor, "is_cuda", False))

    _cuda = staticmethod(_torch_cuda)  # tests swap in a fake torch.cuda here

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
        return self._nvml.memory(self.index)[0]

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
        used, nvml_total, nvml_error = self._nvml.memory(self.index)
        figures = self._allocator_figures()
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
            allocated_bytes=figures[0],
            reserved_bytes=figures[1],
            peak_allocated_bytes=figures[2],
            compute_capability=capability,  # type: ignore[arg-type]
            supports_bf16=bf16,
            # fp8 storage only needs the dtype to exist: weights are upcast before compute.
            supports_fp8=_has_fp8_dtype(),
            driver_version=self._nvml.driver_version(),
            cuda_version=cuda_version,
            host_total_bytes=host_total,
            host_available_bytes=host_available,
            nvml_error=nvml_error,
        )

    def snapshot(self) -> MemorySnapshot:
        used, _, _ = self._nvml.memory(self.index)
        return replace(self.counters(), device_used=used, host_rss=host_rss())

    def _allocator_figures(self) -> tuple[int, int, int, int]:
        """Allocated and reserved bytes and their peaks, from one read of the caching allocator's statistics.
        torch's ``memory_allocated`` and its siblings each build the whole statistics table and flatten it in Python
        for one figure; the per-cell hooks read all four twice a cell."""
        stats = self._cuda().memory_stats_as_nested_dict(self.index)
        allocated = stats.get("allocated_bytes", {}).get("all", {})
        reserved = stats.get("reserved_bytes", {}).get("all", {})
        return (int(allocated.get("current", 0)), int(reserved.get("current", 0)), int(allocated.get("peak", 0)),
                int(reserved.get("peak", 0)))

    def counters(self) -> MemorySnapshot:
        allocated, reserved, peak_allocated, peak_reserved = self._allocator_figures()
        return MemorySnapshot(time=time.perf_counter(), allocated=allocated, reserved=reserved,
                              peak_allocated=peak_allocated, peak_reserved=peak_reserved)

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

    def allocator_counters(self) -> dict[str, int]:
        stats = self._cuda().memory_stats_as_nested_dict(self.index)  # the counters are its top-level keys
        return {key: int(stats.get(key, 0)) for key in _ALLOCATOR_COUNTERS}

    def expandable_segments(self) -> bool | None:
        if self._expandable is not None:
            return self._expandable
        try:
            return "expandable_segments:true" in _allocator_settings().replace(" ", "").lower()
        except Exception:
            return None

    def use_expandable_segments(self) -> bool:
        """Let the caching allocator grow and shrink its segments in place where the torch build supports it (the
        native allocator on Linux), unless ``PYTORCH_ALLOC_CONF`` or ``PYTORCH_CUDA_ALLOC_CONF`` already says
        ``expandable_segments``. Under a memory cap, an allocator with fixed segments frees its whole cache and
        retries when a request fits no cached block (a device-wide synchronize, in the middle of a step); expandable
        segments map more memory onto the segment instead. Segments reserved before this stay as they were, so the
        device calls it before its first allocation. Returns whether they are on."""
        import sys

        if any("expandable_segments" in os.environ.get(name, "") for name in _ALLOC_CONF):
            return bool(self.expandable_segments())
        if not sys.platform.startswith("linux"):
            return False
        try:
            import torch

            if torch.cuda.memory.get_allocator_backend() != "native":
                return False
            setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
            if setter is None:  # torch before the accelerator-wide settings
                setter = torch.cuda.memory._set_allocator_settings
            setter("expandable_segments:True")
        except Exception as exc:  # a build without them answers with an error: fixed segments, as before
            logger.debug("expandable segments not available: %s", exc)
            return False
        self._expandable = True
        return True

    def streams(self) -> CudaCopyStreams:
        if self._streams is None:
            self._streams = CudaCopyStreams(self.index)
        return self._streams

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


class CudaCopyStreams(CopyStreams):
    """Copies on a side stream from page-locked host memory, ordered with the compute stream by reused events.

    Args:
        index: the CUDA device index.
    """

    def __init__(self, index: int = 0) -> None:
        self.index = index

    def copy_stream(self):
        return _torch_cuda().Stream(self.index)

    def host_buffer(self, nbytes: int):
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def new_event(self):
        return _torch_cuda().Event()

    def mark_done(self, event) -> None:
        event.record(_torch_cuda().current_stream(self.index))

    def issue_copy(self, stream, dst, src, after=None, done=None):
        cuda = _torch_cuda()
        if stream is None:  # in order on the compute stream itself
            dst.copy_(src, non_blocking=src.is_pinned())
            return None  # nothing to wait for: the compute stream reads dst after the copy
        if after is None:  # dst may still be read by any kernel queued so far
            stream.wait_stream(cuda.current_stream(self.index))
        else:  # only by the compute ``after`` marks
            stream.wait_event(after)
        with cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        if done is None:
            return stream.record_event()
        done.record(stream)
        return done

    def wait_copy(self, handle) -> None:
        if handle is not None:
            _torch_cuda().current_stream(self.index).wait_event(handle)


def _has_fp8_dtype() -> bool:
    try:
        import torch

        return hasattr(torch, "float8_e4m3fn")
    except Exception:
        return False
