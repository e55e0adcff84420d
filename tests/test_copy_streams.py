"""The device layer's side of streaming on a CPU: CUDA copy streams ordered by reused events (through a recording
stand-in for ``torch.cuda``), and expandable segments asked of the allocator only where the user has not chosen."""

from __future__ import annotations

import pytest
import torch

from mlnb.device import CudaCopyStreams, CudaDevice
from mlnb.device import cuda as cuda_module


class _Recorder:
    """Streams and events that log what the copy streams ask of them."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.events = 0

    def Event(self):  # noqa: N802 - torch.cuda's name
        recorder = self
        recorder.events += 1
        name = f"event {recorder.events}"

        class Event:
            def record(self, stream=None):
                recorder.log.append(("record", name, stream))

            def __repr__(self):
                return name

        return Event()

    def current_stream(self, index=None):
        return "compute"

    def stream(self, stream):
        recorder = self

        class Context:
            def __enter__(self):
                recorder.log.append(("enter", stream))

            def __exit__(self, *exc):
                recorder.log.append(("exit", stream))

        return Context()


class _Stream:
    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    def wait_stream(self, other):
        self.recorder.log.append(("copy waits for stream", other))

    def wait_event(self, event):
        self.recorder.log.append(("copy waits for", repr(event)))

    def record_event(self):
        self.recorder.log.append(("new event",))
        return "one-off"

    def __repr__(self):
        return "copy"


def test_a_copy_after_a_mark_waits_for_that_compute_only_and_records_the_reused_event(monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(cuda_module, "_torch_cuda", lambda: recorder)
    streams = CudaCopyStreams(0)
    stream = _Stream(recorder)
    arrived, computed = streams.new_event(), streams.new_event()
    dst, src = torch.zeros(4), torch.arange(4.0)
    assert streams.issue_copy(stream, dst, src, done=arrived) is arrived
    streams.mark_done(computed)
    assert streams.issue_copy(stream, dst, src, after=computed, done=arrived) is arrived
    assert recorder.log == [
        ("copy waits for stream", "compute"), ("enter", stream), ("exit", stream), ("record", "event 1", stream),
        ("record", "event 2", "compute"),
        ("copy waits for", "event 2"), ("enter", stream), ("exit", stream), ("record", "event 1", stream),
    ]
    assert recorder.events == 2 and torch.equal(dst, src)  # no event made per copy
    recorder.log.clear()
    assert streams.issue_copy(stream, dst, src) == "one-off"  # without one to reuse, a new one as before
    assert streams.issue_copy(None, dst, src, done=arrived) is None  # on the compute stream: nothing to wait for


@pytest.fixture
def allocator(monkeypatch):
    """torch's allocator settings as a recording stand-in; no allocator configuration in the environment."""
    calls: list[str] = []
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    monkeypatch.setattr(torch.cuda.memory, "get_allocator_backend", lambda: "native")
    monkeypatch.setattr("sys.platform", "linux")  # expandable segments are a Linux feature
    return calls


def test_expandable_segments_are_asked_for_where_the_native_allocator_runs(allocator, monkeypatch):
    device = CudaDevice(0)
    assert device.use_expandable_segments() is True and allocator == ["expandable_segments:True"]
    assert device.expandable_segments() is True
    monkeypatch.setattr(torch.cuda.memory, "get_allocator_backend", lambda: "cudaMallocAsync")
    allocator.clear()
    assert CudaDevice(0).use_expandable_segments() is False and allocator == []  # that backend has none


@pytest.mark.parametrize("variable", ["PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"])
def test_a_user_s_own_expandable_segments_setting_is_left_as_it_is(allocator, monkeypatch, variable):
    monkeypatch.setenv(variable, "expandable_segments:False")
    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: "expandable_segments:False",
                        raising=False)
    device = CudaDevice(0)
    assert device.use_expandable_segments() is False and allocator == []
    assert device.expandable_segments() is False


def test_a_build_that_refuses_the_setting_keeps_fixed_segments(allocator, monkeypatch):
    def refuse(setting):
        raise RuntimeError("expandable_segments not supported on this platform")

    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", refuse, raising=False)
    assert CudaDevice(0).use_expandable_segments() is False


def test_only_the_detected_cuda_device_asks_for_them(monkeypatch):
    from mlnb.device import current

    asked = []
    monkeypatch.setattr(CudaDevice, "use_expandable_segments", lambda self: asked.append(self) or True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("MLNB_DEVICE", raising=False)
    device = current._detect()
    assert isinstance(device, CudaDevice) and asked == [device]
