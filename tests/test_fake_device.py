"""The simulated GPU of :mod:`mlnb.testing`: it counts like a caching allocator, its out-of-memory error is
recognised as a CUDA one, and ``cuda_like`` makes the library take its CUDA paths."""

from __future__ import annotations

import pytest
import torch

from mlnb.device import CpuDevice, is_out_of_memory
from mlnb.testing import FakeDevice, FakeOutOfMemoryError
from mlnb.units import GiB, MiB


def test_fake_device_counts_like_a_caching_allocator():
    """Allocations raise allocated/reserved/peak; release lowers allocated only; empty_cache returns reserved."""
    dev = FakeDevice(total=4 * GiB)
    dev.allocate(1 * GiB)
    dev.allocate(512 * MiB)
    assert dev.allocated == 1536 * MiB
    dev.release(1 * GiB)
    assert dev.allocated == 512 * MiB
    assert dev.reserved == 1536 * MiB  # cached, not returned
    assert dev.peak_allocated == 1536 * MiB
    assert dev.free_bytes() == 4 * GiB - 1536 * MiB
    assert dev.empty_cache() is True
    assert dev.reserved == 512 * MiB
    assert dev.empty_cache_calls == 1
    assert dev.free_bytes() == 4 * GiB - 512 * MiB
    dev.reset_peak()
    assert dev.peak_allocated == 512 * MiB


def test_fake_device_out_of_memory():
    """Past the card's size (counting other processes) an allocation raises the fake OOM and changes nothing."""
    dev = FakeDevice(total=2 * GiB, other_processes=512 * MiB)
    dev.allocate(1 * GiB)
    with pytest.raises(FakeOutOfMemoryError, match="out of memory"):
        dev.allocate(1 * GiB)
    assert dev.allocated == 1 * GiB
    assert dev.is_oom(FakeOutOfMemoryError("x"))
    dev.allocate(512 * MiB)  # exactly fills the card
    assert dev.allocated + dev.other_processes == dev.total


def test_fake_device_info_and_snapshot():
    """The fake reports itself as an available GPU; with ``nvml_fails`` the device-wide fields are N/A."""
    dev = FakeDevice(total=4 * GiB, other_processes=256 * MiB)
    dev.allocate(GiB)
    info = dev.info()
    assert info.available and info.kind == "fake"
    assert info.total_bytes == 4 * GiB
    assert info.nvml_used_bytes == GiB + 256 * MiB
    assert info.nvml_error is None
    broken = FakeDevice(nvml_fails=True)
    assert broken.info().nvml_used_bytes is None
    assert "NVML" in broken.info().nvml_error
    assert broken.snapshot().device_used is None
    assert broken.snapshot().allocated == 0


def test_fake_device_memory_cap():
    """A cap shrinks the simulated card."""
    dev = FakeDevice(total=8 * GiB)
    dev.set_memory_cap(2 * GiB)
    with pytest.raises(FakeOutOfMemoryError):
        dev.allocate(3 * GiB)


def test_the_fake_out_of_memory_is_recognised_as_a_cuda_one():
    """The fake's OOM is a ``torch.OutOfMemoryError``: every device recognises it by type (whatever its message),
    and code that catches torch's error catches it."""
    dev = FakeDevice(total=GiB)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        dev.allocate(2 * GiB)
    assert isinstance(caught.value, FakeOutOfMemoryError)
    assert dev.is_oom(caught.value) and CpuDevice().is_oom(caught.value) and is_out_of_memory(caught.value)
    assert dev.is_oom(FakeOutOfMemoryError("no allocator message"))
    assert not dev.is_oom(RuntimeError("shape mismatch"))


def test_cuda_like_reports_cuda_and_still_computes_on_the_cpu():
    """``cuda_like`` switches ``is_cuda`` on and nothing else: the device stays a fake that computes on the CPU."""
    plain, cuda_like = FakeDevice(), FakeDevice(total=8 * GiB, cuda_like=True)
    assert plain.is_cuda is False and cuda_like.is_cuda is True
    assert cuda_like.torch_device == "cpu" and cuda_like.kind == "fake" and cuda_like.info().kind == "fake"
    assert cuda_like.total == 8 * GiB and cuda_like.has_memory_counters
