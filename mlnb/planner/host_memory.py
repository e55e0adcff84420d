"""Giving host memory that weights no longer need back to the operating system.

When weights move from host RAM to the GPU, glibc's allocator keeps much of the freed memory in its heap, so the
process's resident size stays as large as if the weights were still there. Pinned copies made afterwards for
streaming then add to it. ``malloc_trim(0)`` returns the free pages; elsewhere (macOS, musl, Windows) this is a no-op.

Weights loaded from safetensors are not in the heap at all: diffusers maps each file, and a tensor is a view of the
mapping. Copying a weight to the GPU or to pinned memory reads its pages, which then count in the process's resident
size until the whole file's mapping goes, that is until the last tensor of the file has moved: a plan that pins
part of the model would otherwise hold every page of the files read beside the pinned copies.
``madvise(MADV_PAGEOUT)`` (Linux 5.4 and later) asks the kernel to reclaim a mapping's pages: clean pages of a file
leave the process (a tensor that still views them reads them again from the file), and a page that was changed is
kept or swapped, never lost.

The planner gives host memory back as it places a pipeline (:mod:`.apply`) and as it packs pinned copies
(:mod:`.streaming`). A unit a plan leaves in the files' mapping (:class:`.packed.MappedUnit`) is read again at every
copy to the GPU; after each copy :func:`release_pages` drops its pages from the process (``MADV_DONTNEED`` on the
pages of its tensors): they leave its resident size but stay in the kernel's page cache while the host has room, so
the next copy reads them from memory rather than from the disk. Those weights are only ever read (a mapped unit's
tensors point at the GPU or at the mapping, and LoRAs are applied unfused), so no change to them is dropped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

__all__ = ["trim_host_heap", "release_mapped_weights", "give_back_host_memory", "GiveBackEvery", "weight_file_ranges",
           "release_pages"]

_MiB = 2**20
_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21
_PAGE = 4096
_WEIGHT_FILES = (".safetensors",)

_libc = None


def _libc_function(name: str):
    """``name`` from the C library (Linux), or None where there is none."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return getattr(_libc, name)
    except (OSError, AttributeError) as exc:  # not glibc (musl has no malloc_trim)
        logger.debug("%s is not available: %s", name, exc)
        return None


def trim_host_heap() -> bool:
    """Return free heap memory to the OS (glibc only). True when it ran."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def weight_file_ranges(suffixes: tuple[str, ...] = _WEIGHT_FILES) -> list[tuple[int, int]]:
    """The address ranges ``(start, end)`` of this process's mappings of weight files, sorted (Linux; elsewhere
    none)."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as fh:
            lines = fh.readlines()
    except OSError as exc:
        logger.debug("cannot read this process's mappings: %s", exc)
        return []
    ranges = []
    for line in lines:
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].rstrip().endswith(suffixes):
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            ranges.append((start, end))
    return sorted(ranges)


def _page_ranges(tensors, files: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The whole pages of ``tensors``' bytes that lie in one of the mappings ``files``, merged; a tensor outside
    them (host memory of the process's own: dropping it would lose it) gives none."""
    spans = []
    for tensor in tensors:
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        for low, high in files:
            if low <= start and end <= high:  # page-aligned outward, within the same file's mapping
                spans.append((max(low, start // _PAGE * _PAGE), min(high, -(-end // _PAGE) * _PAGE)))
                break
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def release_pages(tensors, files: list[tuple[int, int]]) -> int:
    """Drop the pages of ``tensors`` that are views of the weight-file mappings ``files`` (from
    :func:`weight_file_ranges`) from this process's resident memory (``MADV_DONTNEED``: a later read faults them in
    again, from the page cache while it holds them); returns the bytes advised. Tensors in other memory are left."""
    madvise = _libc_function("madvise")
    if madvise is None or not files:
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    released = 0
    for start, end in _page_ranges(tensors, files):
        if madvise(start, end - start, _MADV_DONTNEED) == 0:
            released += end - start
    return released


def release_mapped_weights(suffixes: tuple[str, ...] = _WEIGHT_FILES) -> int:
    """Ask the kernel to reclaim the resident pages of this process's mappings of weight files (Linux 5.4 and
    later; elsewhere a no-op); returns the bytes of the mappings advised."""
    madvise = _libc_function("madvise")
    if madvise is None:
        return 0
    try:
        with open("/proc/self/maps") as fh:
            lines = fh.readlines()
    except OSError as exc:
        logger.debug("cannot read this process's mappings: %s", exc)
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    released = 0
    for line in lines:
        fields = line.split(None, 5)
        if len(fields) < 6 or not fields[5].rstrip().endswith(suffixes):
            continue
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        if madvise(start, end - start, _MADV_PAGEOUT) == 0:
            released += end - start
    return released


def give_back_host_memory() -> None:
    """Both: the heap's free pages, and the pages of mapped weight files read so far."""
    trim_host_heap()
    release_mapped_weights()


class GiveBackEvery:
    """A callback for code that reads weights part by part (moves to the GPU, casts from the mapping): called with
    each part's bytes, it gives back the pages of the mapped weight files read so far once ``step`` bytes have been
    read since the last time (reading this process's mappings costs a few milliseconds, so not at every tensor)."""

    def __init__(self, step: int = 64 * _MiB) -> None:
        self.step, self.read = step, 0

    def __call__(self, nbytes: int) -> None:
        self.read += nbytes
        if self.read >= self.step:
            release_mapped_weights()
            self.read = 0
