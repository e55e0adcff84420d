"""The device layer: CPU is the N/A case, NVML failures never raise, the copy streams order copies, and the current
device is detected once."""

from __future__ import annotations

import logging
import sys
import types

import pytest

import mlnb.device.current as current_mod
from mlnb.device import (
    CopyStreams,
    CpuDevice,
    CudaCopyStreams,
    CudaDevice,
    DeviceInfo,
    get_device,
    host_memory,
    is_out_of_memory,
    set_device,
    use_device,
)
from mlnb.device.nvml import Nvml, shared_nvml
from mlnb.testing import FakeDevice, FakeOutOfMemoryError
from mlnb.units import GiB
from fakes import FakeCuda

GPU_INFO_FIELDS = (
    "index", "total_bytes", "free_bytes", "nvml_used_bytes", "nvml_total_bytes", "allocated_bytes",
    "reserved_bytes", "peak_allocated_bytes", "compute_capability", "driver_version", "cuda_version",
)
GPU_SNAPSHOT_FIELDS = ("allocated", "reserved", "peak_allocated", "peak_reserved", "device_used")


@pytest.fixture
def fresh_current(monkeypatch):
    """Forget the detected device for the test; the previous one comes back afterwards."""
    monkeypatch.setattr(current_mod, "_current", None)


# ---------------------------------------------------------------------------------------------------------------
# CPU: the N/A case


def test_cpu_device_info_is_not_available_with_na_gpu_fields():
    """Without CUDA every GPU field is None (N/A) and the host fields are filled."""
    info = CpuDevice().info()
    assert isinstance(info, DeviceInfo)
    assert info.available is False
    assert info.kind == "cpu"
    for name in GPU_INFO_FIELDS:
        assert getattr(info, name) is None, name
    assert info.supports_fp8 is False and info.supports_bf16 is False
    assert info.host_total_bytes > 0 and 0 < info.host_available_bytes <= info.host_total_bytes


def test_cpu_device_queries_and_cleanup_never_raise():
    """Snapshots have N/A GPU fields; reset, synchronize and cache clearing are no-ops."""
    dev = CpuDevice()
    snap = dev.snapshot()
    for name in GPU_SNAPSHOT_FIELDS:
        assert getattr(snap, name) is None, name
    assert snap.host_rss > 0
    dev.reset_peak()
    dev.synchronize()
    assert dev.empty_cache() is False
    assert dev.free_bytes() is None
    assert dev.h2d_bandwidth() is None
    assert dev.is_cuda is False and dev.has_memory_counters is False
    assert dev.torch_device == "cpu"


def test_cpu_device_memory_cap_is_refused_with_a_reason():
    """Capping memory needs a GPU; it says so rather than pretending."""
    with pytest.raises(RuntimeError, match="CUDA"):
        CpuDevice().set_memory_cap(GiB)


def test_host_fields_are_na_when_psutil_is_missing(monkeypatch):
    """A missing psutil turns host figures into N/A instead of breaking the status display."""
    monkeypatch.setitem(sys.modules, "psutil", None)  # makes ``import psutil`` raise ImportError
    assert host_memory() == (None, None)
    info = CpuDevice().info()
    assert info.host_total_bytes is None and info.host_available_bytes is None
    assert CpuDevice().snapshot().host_rss is None


def test_is_oom_recognises_fake_torch_and_plain_runtime_errors():
    """Out-of-memory is recognised by type (fake or torch) or by the allocator's message; nothing else is."""
    import torch

    dev = CpuDevice()
    assert dev.is_oom(FakeOutOfMemoryError("x"))
    assert dev.is_oom(torch.OutOfMemoryError("Tried to allocate 2.00 GiB"))
    assert dev.is_oom(RuntimeError("cuDNN error: CUDA out of memory while running"))
    assert not dev.is_oom(RuntimeError("shape mismatch"))
    assert not dev.is_oom(ValueError("out of memory"))
    assert not dev.is_oom(KeyboardInterrupt())
    assert is_out_of_memory(torch.OutOfMemoryError("x")) and not is_out_of_memory(RuntimeError("shape mismatch"))


# ---------------------------------------------------------------------------------------------------------------
# NVML


class _MemInfo:
    used = 3 * GiB
    total = 16 * GiB


def _fake_pynvml(init_fails: bool = False, queries_fail: bool = False, calls: list | None = None):
    mod = types.ModuleType("pynvml")

    def record(name):
        if calls is not None:
            calls.append(name)

    def nvmlInit():
        record("init")
        if init_fails:
            raise RuntimeError("NVML Shared Library Not Found")

    def query(result):
        def call(*args):
            record("query")
            if queries_fail:
                raise RuntimeError("GPU is lost")
            return result

        return call

    mod.nvmlInit = nvmlInit
    mod.nvmlDeviceGetHandleByIndex = query("handle")
    mod.nvmlDeviceGetMemoryInfo = query(_MemInfo())
    mod.nvmlSystemGetDriverVersion = query(b"550.54.15")
    return mod


def test_nvml_missing_gives_na_and_an_error_string(monkeypatch):
    """Without nvidia-ml-py: no exception, None figures, and an error that says what is missing."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    nvml = Nvml()
    assert nvml.memory(0) == (None, None, "nvidia-ml-py is not installed")
    assert nvml.driver_version() is None
    assert nvml.error == "nvidia-ml-py is not installed"


def test_nvml_init_failing_gives_na_and_the_reason(monkeypatch):
    """A library that imports but cannot initialise (no driver) is N/A with the reason."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(init_fails=True))
    nvml = Nvml()
    used, total, error = nvml.memory(0)
    assert (used, total) == (None, None)
    assert error.startswith("NVML unavailable") and "Shared Library" in error
    assert nvml.driver_version() is None


def test_nvml_raising_on_every_query_gives_na(monkeypatch):
    """Every query raising still returns None figures and a 'query failed' error, never an exception."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(queries_fail=True))
    nvml = Nvml()
    used, total, error = nvml.memory(0)
    assert (used, total) == (None, None)
    assert "NVML query failed" in error and "GPU is lost" in error
    assert nvml.driver_version() is None
    assert nvml.error is None  # initialised fine; only the queries fail


def test_nvml_working_reports_bytes_and_initialises_once(monkeypatch):
    """A working NVML gives device-wide used/total in bytes and a decoded driver version; init runs once."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(calls=calls))
    nvml = Nvml()
    assert calls == []  # lazy: nothing until the first query
    assert nvml.memory(0) == (3 * GiB, 16 * GiB, None)
    assert nvml.memory(0) == (3 * GiB, 16 * GiB, None)
    assert nvml.driver_version() == "550.54.15"
    assert calls.count("init") == 1


@pytest.fixture
def fake_cuda(monkeypatch):
    cuda = FakeCuda()
    monkeypatch.setattr(CudaDevice, "_cuda", staticmethod(lambda: cuda))
    return cuda


@pytest.mark.parametrize("pynvml", [None, "init_fails", "queries_fail"], ids=["missing", "init-fails", "queries-fail"])
def test_cuda_info_with_broken_nvml_has_na_nvml_fields_and_an_error(monkeypatch, fake_cuda, pynvml):
    """``CudaDevice.info()`` with NVML missing or failing: torch figures are there, NVML ones are None, the error
    is reported, and nothing raises."""
    module = None if pynvml is None else _fake_pynvml(init_fails=pynvml == "init_fails", queries_fail=pynvml == "queries_fail")
    monkeypatch.setitem(sys.modules, "pynvml", module)
    dev = CudaDevice(0, nvml=Nvml())
    info = dev.info()
    assert info.available is True and info.kind == "cuda" and info.name == "Tesla T4"
    assert (info.free_bytes, info.total_bytes) == (10 * GiB, 16 * GiB)
    assert (info.allocated_bytes, info.reserved_bytes, info.peak_allocated_bytes) == (1 * GiB, 2 * GiB, 3 * GiB)
    assert info.compute_capability == (7, 5)
    assert info.nvml_used_bytes is None and info.nvml_total_bytes is None and info.driver_version is None
    assert info.nvml_error
    snap = dev.snapshot()
    assert snap.device_used is None
    assert (snap.allocated, snap.reserved, snap.peak_allocated, snap.peak_reserved) == (1 * GiB, 2 * GiB, 3 * GiB, 4 * GiB)


def test_cuda_info_with_working_nvml(monkeypatch, fake_cuda):
    """With NVML working the device-wide figures come from it and there is no error."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    info = CudaDevice(0, nvml=Nvml()).info()
    assert (info.nvml_used_bytes, info.nvml_total_bytes) == (3 * GiB, 16 * GiB)
    assert info.driver_version == "550.54.15"
    assert info.nvml_error is None


def test_cuda_info_survives_a_failing_mem_get_info(monkeypatch):
    """A failing ``mem_get_info`` leaves free/total N/A in ``info()`` and ``free_bytes()``; no exception."""
    cuda = FakeCuda(mem_get_info_fails=True)
    monkeypatch.setattr(CudaDevice, "_cuda", staticmethod(lambda: cuda))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    dev = CudaDevice(0, nvml=Nvml())
    info = dev.info()
    assert info.free_bytes is None and info.total_bytes is None
    assert dev.free_bytes() is None


def test_a_cuda_snapshot_reads_the_allocator_s_statistics_once(monkeypatch, fake_cuda):
    """torch's ``memory_allocated``, ``memory_reserved`` and their peaks each build and flatten the allocator's whole
    statistics table for one figure: the four figures of a snapshot (read twice a cell by the per-cell hooks) come
    from one read of it, and so do the allocator's counters."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    dev = CudaDevice(0, nvml=Nvml())
    counters = dev.counters()
    assert (counters.allocated, counters.reserved, counters.peak_allocated, counters.peak_reserved) == (
        1 * GiB, 2 * GiB, 3 * GiB, 4 * GiB)
    assert fake_cuda.stats_reads == 1
    dev.snapshot()
    assert fake_cuda.stats_reads == 2
    assert dev.allocator_counters()["num_device_alloc"] == 7 and fake_cuda.stats_reads == 3


def test_cuda_cleanup_synchronizes_then_empties_the_cache(fake_cuda):
    """The CUDA cache clear is synchronize, ``empty_cache`` and ``ipc_collect``, in that order."""
    dev = CudaDevice(0)
    assert dev.empty_cache() is True
    assert fake_cuda.calls == ["synchronize", "empty_cache", "ipc_collect"]
    dev.reset_peak()
    assert fake_cuda.calls[-1] == "reset_peak_memory_stats"


def test_cuda_timing_marks_are_timed_events_on_the_queue_read_in_seconds(fake_cuda):
    """A mark records an event (nothing waits); the seconds between two are torch's milliseconds / 1000."""
    dev = CudaDevice(0)
    start = dev.timing_mark()
    fake_cuda.synchronize()
    end = dev.timing_mark()
    assert fake_cuda.calls == ["record", "synchronize", "record"]
    assert dev.seconds_between(start, end) == pytest.approx(0.002)


def test_a_cuda_device_reads_the_shared_nvml_session_unless_given_its_own():
    """NVML initialises once per process: every CUDA device shares one session, and a test injects its own."""
    assert CudaDevice(0)._nvml is shared_nvml() is shared_nvml()
    own = Nvml()
    assert CudaDevice(0, nvml=own)._nvml is own


# ---------------------------------------------------------------------------------------------------------------
# Copy streams


def test_cpu_copy_streams_copy_at_once_from_plain_memory():
    """Without CUDA there is no copy stream, host buffers are plain memory, and a copy is done when issued."""
    import torch

    streams = CpuDevice().streams()
    assert type(streams) is CopyStreams and streams.copy_stream() is None
    buffer = streams.host_buffer(16)
    assert buffer.dtype == torch.uint8 and buffer.numel() == 16 and not buffer.is_pinned()
    src, dst = torch.arange(16, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8)
    handle = streams.issue_copy(None, dst, src)
    assert handle is None and torch.equal(dst, src)
    streams.wait_copy(handle)


class _StreamsCuda:
    """The slice of ``torch.cuda`` that :class:`CudaCopyStreams` uses, recording the order of its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.compute = self.Stream(0, "compute")

    def Stream(self, index, name="copy"):
        cuda = self

        class Stream:
            def wait_stream(self, other):
                cuda.calls.append(("wait_stream", name, other.name))

            def record_event(self):
                cuda.calls.append(("record_event", name))
                return ("event", name)

            def wait_event(self, event):
                cuda.calls.append(("wait_event", name, event))

        stream = Stream()
        stream.name = name
        return stream

    def current_stream(self, index):
        return self.compute

    def stream(self, stream):
        import contextlib

        @contextlib.contextmanager
        def on():
            self.calls.append(("on", stream.name))
            yield

        return on()


def test_cuda_copy_streams_order_a_copy_after_the_compute_and_the_compute_after_the_copy(monkeypatch):
    """A copy on a side stream waits for the compute queued before it and records an event; waiting for it makes
    the compute stream wait for that event. Nothing makes the host wait."""
    import torch

    import mlnb.device.cuda as cuda_mod

    cuda = _StreamsCuda()
    monkeypatch.setattr(cuda_mod, "_torch_cuda", lambda: cuda)
    device = CudaDevice(0)
    streams = device.streams()
    assert isinstance(streams, CudaCopyStreams) and device.streams() is streams
    side = streams.copy_stream()
    src, dst = torch.arange(8, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8)
    handle = streams.issue_copy(side, dst, src)
    assert torch.equal(dst, src)
    assert cuda.calls == [("wait_stream", "copy", "compute"), ("on", "copy"), ("record_event", "copy")]
    streams.wait_copy(handle)
    assert cuda.calls[-1] == ("wait_event", "compute", ("event", "copy"))
    cuda.calls.clear()
    dst.zero_()
    assert streams.issue_copy(None, dst, src) is None and torch.equal(dst, src)  # in order on the compute stream
    streams.wait_copy(None)
    assert cuda.calls == []


# ---------------------------------------------------------------------------------------------------------------
# The current device


def test_use_device_restores_the_previous_device(fresh_current):
    """``use_device`` swaps the device for the block and restores it, also on an exception and when nested."""
    outer = CpuDevice()
    set_device(outer)
    fake_a, fake_b = FakeDevice(), FakeDevice()
    with use_device(fake_a) as dev:
        assert dev is fake_a and get_device() is fake_a
        with use_device(fake_b):
            assert get_device() is fake_b
        assert get_device() is fake_a
    assert get_device() is outer
    with pytest.raises(ZeroDivisionError):
        with use_device(fake_a):
            1 / 0
    assert get_device() is outer


def test_get_device_detects_once(fresh_current):
    """Detection runs once and the same object comes back."""
    assert get_device() is get_device()


def test_mlnb_device_cpu_forces_the_cpu_even_with_cuda(monkeypatch, fresh_current):
    """``MLNB_DEVICE=cpu`` wins over an available CUDA device; without it CUDA is picked."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("MLNB_DEVICE", raising=False)
    detected = get_device()
    assert isinstance(detected, CudaDevice) and detected.index == 0
    set_device(None)  # re-detect
    monkeypatch.setenv("MLNB_DEVICE", "CPU")
    assert isinstance(get_device(), CpuDevice)


def test_a_broken_cuda_probe_falls_back_to_the_cpu(monkeypatch, fresh_current, caplog):
    """A CUDA install that raises on probing gives the CPU device and a warning, not a crash."""
    import torch

    def broken():
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.delenv("MLNB_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", broken)
    with caplog.at_level(logging.WARNING, logger="mlnb.device"):
        assert isinstance(get_device(), CpuDevice)
    assert "CUDA probe failed" in caplog.text


def test_cuda_describe_is_cached_and_honours_the_cap(monkeypatch):
    """The per-cell report asks for name and total after every cell: one query, then the cached pair (capped)."""
    cuda = FakeCuda()
    queries = []
    real = cuda.get_device_name
    monkeypatch.setattr(cuda, "get_device_name", lambda index: queries.append(index) or real(index))
    monkeypatch.setattr(CudaDevice, "_cuda", staticmethod(lambda: cuda))
    device = CudaDevice(0)
    assert device.describe() == ("Tesla T4", 16 * GiB)
    assert device.describe() == ("Tesla T4", 16 * GiB)
    assert queries == [0]
    device._cap = 4 * GiB
    assert device.describe() == ("Tesla T4", 4 * GiB)
