"""Giving host memory that placed or pinned weights no longer need back to the operating system (Linux)."""

from __future__ import annotations

import sys

import pytest


def test_trim_host_heap_runs_on_linux():
    from mlnb.planner.host_memory import trim_host_heap

    assert trim_host_heap() is sys.platform.startswith("linux")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self and calls madvise")
@pytest.mark.parametrize("access", ["copy", "read"])  # private (how torch maps a file) and read-only shared
def test_pages_read_from_a_mapped_weight_file_leave_the_process_and_read_back_the_same(tmp_path, access):
    import mmap
    import re

    from mlnb.planner.host_memory import release_mapped_weights

    def rss_file() -> int:
        return int(re.search(r"RssFile:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

    path = tmp_path / "unet.safetensors"
    path.write_bytes(bytes(range(256)) * (128 * 1024))  # 32 MiB
    other = tmp_path / "notes.bin"
    other.write_bytes(b"x" * (8 * 2**20))
    with open(path, "rb") as fh, open(other, "rb") as fo:
        kind = mmap.ACCESS_COPY if access == "copy" else mmap.ACCESS_READ
        weights, untouched = mmap.mmap(fh.fileno(), 0, access=kind), mmap.mmap(fo.fileno(), 0, access=kind)
    digest = hash(weights[:])  # reads every page
    hash(untouched[:])
    before = rss_file()
    released = release_mapped_weights()
    if released == 0:
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux 5.4+)")
    assert released >= 32 * 2**20
    assert before - rss_file() >= 24 * 2**20  # the weight file's pages left; the other mapping was not asked
    assert hash(weights[:]) == digest  # read back from the file, unchanged
    weights.close(), untouched.close()
