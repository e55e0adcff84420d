"""``FakeDevice``: a simulated GPU for tests of the GPU code paths on a machine without one.

It touches neither ``torch.cuda`` nor NVML: compute runs on the CPU while the memory counters behave like a caching
allocator. Its out-of-memory error is a ``torch.OutOfMemoryError``, so every device, and any code that catches
torch's error, recognises it as it would a real one. No module of the library imports this one.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from ..device import CopyStreams, Device, DeviceInfo, MemorySnapshot, host_memory, host_rss

__all__ = ["FakeDevice", "FakeOutOfMemoryError", "SimulatedCopyStreams", "CARDS"]

# The cards FakeDevice.card simulates: what their CudaDevice.info() reports, named as simulated ones so that the card
# facts a test or a tutorial records never stand for a real card's.
CARDS = {
    "t4": dict(name="simulated Tesla T4", total=15 * 2**30, compute_capability=(7, 5), supports_bf16=True),
    "ampere": dict(name="simulated NVIDIA A10G", total=24 * 2**30, compute_capability=(8, 6), supports_bf16=True),
}


class FakeOutOfMemoryError(torch.OutOfMemoryError):
    """Raised by :class:`FakeDevice` to simulate a CUDA out-of-memory error on CPU."""


class SimulatedEvent:
    """An event of :class:`SimulatedCopyStreams`: a name, and how often it has been recorded."""

    def __init__(self, name: str) -> None:
        self.name, self.records = name, 0

    def __repr__(self) -> str:
        return f"<event {self.name}>"


class SimulatedCopyStreams(CopyStreams):
    """The fake device's copy streams: each copy is done when it is issued (on the CPU), and every call is logged in
    order, so that a test can replay the schedule a GPU would run.

    :attr:`log` holds ``("buffer", nbytes)`` for each device buffer, ``("copy", dst, src, after, done)`` for each copy
    (``dst`` and ``src`` data pointers; ``after`` and ``done`` events or None), ``("mark", event)`` for the compute
    marked done and ``("wait", event)`` for each wait of the compute for a copy. :attr:`events_made` counts
    :meth:`new_event` calls. A copy ``after`` an event never marked, or a wait for one never recorded, raises: on a GPU
    it would wait for nothing.
    """

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.events_made = 0

    def copy_stream(self):
        return "simulated copy stream"

    def device_buffer(self, nbytes: int, device):
        self.log.append(("buffer", nbytes))
        return super().device_buffer(nbytes, device)

    def new_event(self):
        self.events_made += 1
        return SimulatedEvent(str(self.events_made))

    def mark_done(self, event) -> None:
        event.records += 1
        self.log.append(("mark", event))

    def issue_copy(self, stream, dst, src, after=None, done=None):
        if after is not None and not after.records:
            raise RuntimeError(f"a copy after {after!r}, which no compute has been marked with")
        dst.copy_(src)
        if stream is None:
            self.log.append(("own copy", src.numel()))
            return None
        if done is None:
            done = SimulatedEvent("one-off")
        done.records += 1
        self.log.append(("copy", dst.data_ptr(), src.data_ptr(), after, done))
        return done

    def wait_copy(self, handle) -> None:
        if handle is not None and not handle.records:
            raise RuntimeError(f"a wait for {handle!r}, which no copy has recorded")
        self.log.append(("wait", handle))

    def entries(self, kind: str) -> list[tuple]:
        """The logged entries of one kind (``"copy"``, ``"wait"``, ``"mark"``, ``"buffer"``)."""
        return [entry for entry in self.log if entry[0] == kind]


@dataclass
class FakeDevice(Device):
    """A simulated GPU for tests of the GPU code paths on a CPU machine.

    Compute still runs on the CPU (``torch_device`` is ``"cpu"``), but memory counters, peaks, free memory and
    cleanup behave like a caching allocator: allocations raise reserved memory, :meth:`empty_cache` returns reserved
    memory down to what is allocated.

    Args:
        total: simulated card size in bytes.
        name: the card's name.
        nvml_fails: simulate NVML raising on every call (device-wide fields become N/A).
        other_processes: bytes used by other processes (device-wide figures only).
        supports_bf16: what :meth:`info` reports for bf16.
        compute_capability: what :meth:`info` reports; ``(8, 0)`` and up compute bf16 in hardware.
        cuda_like: report ``is_cuda`` True, so that the paths mlnb takes only on a CUDA card (offload hooks,
            xformers, applying a budget plan, recording measurements) run, still computing on the CPU. False by
            default: no offload hook is installed.

    Example:
        ```python
        >>> from mlnb.device import use_device
        >>> from mlnb.testing import FakeDevice
        >>> with use_device(FakeDevice(total=4 * 2**30)) as dev:
        ...     dev.allocate(2**30)
        ```
    """

    total: int = 4 * 2**30
    name: str = "Fake GPU"
    nvml_fails: bool = False
    other_processes: int = 0  # bytes used by other processes (device-wide only)
    allocated: int = 0
    reserved: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    empty_cache_calls: int = 0
    synchronize_calls: int = 0
    supports_bf16: bool = True
    compute_capability: tuple[int, int] = (7, 5)  # a T4's; (8, 0) and up compute bf16 in hardware
    cuda_like: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    kind = "fake"
    has_memory_counters = True

    @classmethod
    def card(cls, name: str, **changes) -> "FakeDevice":
        """A simulated card from :data:`CARDS`, CUDA-like (``cuda_like=True``) unless ``changes`` say otherwise.

        Args:
            name: ``"t4"`` (Tesla T4: 15 GiB, compute capability 7.5, bf16 only emulated) or ``"ampere"`` (NVIDIA
                A10G: 24 GiB, 8.6, bf16 in hardware).
            **changes: fields to set besides the card's (``total``, ``supports_bf16``...).

        Example:
            ```python
            >>> FakeDevice.card("t4").info().native_bf16
            False
            ```
        """
        try:
            facts = CARDS[name]
        except KeyError:
            raise ValueError(f"unknown card {name!r}: use one of {', '.join(CARDS)}") from None
        return cls(**{"cuda_like": True, **facts, **changes})

    def __post_init__(self) -> None:
        # id -> weak reference; tensors compare elementwise, so a WeakSet cannot hold them.
        self._tracked: dict[int, weakref.ref] = {}
        self._streams = SimulatedCopyStreams()

    def streams(self) -> SimulatedCopyStreams:
        """The simulated copy streams (one per device, so a test can read their log)."""
        return self._streams

    @property
    def is_cuda(self) -> bool:
        return self.cuda_like

    def track(self, tensor, allocate: bool = False):
        """Mark a CPU tensor as living on the fake GPU (for leak-finding tests); returns it. With ``allocate``, its
        bytes are allocated now and released when the tensor is garbage collected, as a CUDA tensor's would be."""
        if allocate and not self.owns_tensor(tensor):  # tracked twice, allocated once
            nbytes = tensor.numel() * tensor.element_size()
            self.allocate(nbytes)  # first: a simulated OOM leaves it untracked
            weakref.finalize(tensor, self.release, nbytes)
        self._tracked[id(tensor)] = weakref.ref(tensor)
        return tensor

    def owns_tensor(self, tensor) -> bool:
        ref = self._tracked.get(id(tensor))
        return ref is not None and ref() is tensor

    def allocate(self, nbytes: int) -> None:
        """Simulate an allocation; raises :class:`FakeOutOfMemoryError` past the card's size."""
        with self._lock:
            if self.allocated + nbytes + self.other_processes > self.total:
                raise FakeOutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {nbytes} bytes (fake device, {self.total} bytes total)"
                )
            self.allocated += nbytes
            self.reserved = max(self.reserved, self.allocated)
            self.peak_allocated = max(self.peak_allocated, self.allocated)
            self.peak_reserved = max(self.peak_reserved, self.reserved)

    def release(self, nbytes: int) -> None:
        """Simulate freeing a tensor (reserved memory stays cached until :meth:`empty_cache`)."""
        with self._lock:
            self.allocated = max(0, self.allocated - nbytes)

    def free_bytes(self) -> int | None:
        return self.total - self.reserved - self.other_processes

    def info(self) -> DeviceInfo:
        host_total, host_available = host_memory()
        used = None if self.nvml_fails else self.reserved + self.other_processes
        return DeviceInfo(
            available=True,
            name=self.name,
            kind="fake",
            index=0,
            total_bytes=self.total,
            free_bytes=self.free_bytes(),
            nvml_used_bytes=used,
            nvml_total_bytes=None if self.nvml_fails else self.total,
            allocated_bytes=self.allocated,
            reserved_bytes=self.reserved,
            peak_allocated_bytes=self.peak_allocated,
            compute_capability=self.compute_capability,
            supports_bf16=self.supports_bf16,
            supports_fp8=True,
            host_total_bytes=host_total,
            host_available_bytes=host_available,
            nvml_error="NVML query failed: simulated" if self.nvml_fails else None,
        )

    def snapshot(self) -> MemorySnapshot:
        return MemorySnapshot(
            time=time.perf_counter(),
            allocated=self.allocated,
            reserved=self.reserved,
            peak_allocated=self.peak_allocated,
            peak_reserved=self.peak_reserved,
            device_used=None if self.nvml_fails else self.reserved + self.other_processes,
            host_rss=host_rss(),
        )

    def counters(self) -> MemorySnapshot:
        return MemorySnapshot(
            time=time.perf_counter(), allocated=self.allocated, reserved=self.reserved,
            peak_allocated=self.peak_allocated, peak_reserved=self.peak_reserved,
        )

    def describe(self) -> tuple[str, int | None]:
        return self.name, self.total

    def peak_allocated_bytes(self) -> int | None:
        return self.peak_allocated

    def peak_reserved_bytes(self) -> int | None:
        return self.peak_reserved

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_allocated = self.allocated
            self.peak_reserved = self.reserved

    def synchronize(self) -> None:
        self.synchronize_calls += 1

    def empty_cache(self) -> bool:
        with self._lock:
            self.empty_cache_calls += 1
            self.reserved = self.allocated
        return True

    def set_memory_cap(self, cap_bytes: int | None) -> None:
        if cap_bytes is not None:
            self.total = cap_bytes

    def h2d_bandwidth(self, nbytes: int = 256 * 2**20, repeats: int = 5) -> float | None:
        return 12e9

    def device_used_bytes(self) -> int | None:
        return None if self.nvml_fails else self.reserved + self.other_processes
