"""Test doubles shared by several test modules."""

from __future__ import annotations

from mlnb.units import GiB


class FakeCuda:
    """The slice of ``torch.cuda`` that ``CudaDevice`` uses, with fixed figures (a 16 GiB "Tesla T4")."""

    def __init__(self, mem_get_info_fails: bool = False):
        self.mem_get_info_fails = mem_get_info_fails
        self.calls: list[str] = []

    def mem_get_info(self, index):
        if self.mem_get_info_fails:
            raise RuntimeError("CUDA error: unspecified launch failure")
        return 10 * GiB, 16 * GiB

    def get_device_capability(self, index):
        return (7, 5)

    def get_device_name(self, index):
        return "Tesla T4"

    def is_bf16_supported(self):
        return False

    def memory_allocated(self, index=None):
        return 1 * GiB

    def memory_reserved(self, index=None):
        return 2 * GiB

    def max_memory_allocated(self, index=None):
        return 3 * GiB

    def max_memory_reserved(self, index=None):
        return 4 * GiB

    def synchronize(self, index=None):
        self.calls.append("synchronize")

    def empty_cache(self):
        self.calls.append("empty_cache")

    def ipc_collect(self):
        self.calls.append("ipc_collect")

    def reset_peak_memory_stats(self, index=None):
        self.calls.append("reset_peak_memory_stats")
