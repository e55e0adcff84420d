"""Host copies of streamed units, each unit contiguous, packed into page-locked buffers whose sizes are powers of two.

``Tensor.pin_memory()`` allocates through torch's caching host allocator, which rounds every block up to the next
power of two. Pinning a model tensor by tensor therefore locks far more host memory than the weights hold: a 13.1 MB
SDXL projection takes 16 MiB, a 26 MB one 32 MiB, and a whole model up to 1.8× its weights (pytorch/pytorch#95823
and #150517, vllm-project/vllm#56410). On a host with little RAM (Colab's 12.7 GB) that decides whether a plan fits
at all. Here the tensors of each streamed unit are laid out one after the other (one region, so a unit moves to the
GPU in one copy), and the units are packed, largest first, into buffers that are themselves powers of two, so the
allocator has nothing to round. The buffers' size is the power of two, from 64 MiB or the largest unit's (if that is
bigger) up to :data:`MAX_BIN_BYTES`, at which the packing locks the fewest bytes: units just over half a buffer
leave the rest of theirs empty (T5-XXL's 128 MiB attention and 240 MiB feed-forward units in 256 MiB buffers lock
1.38× their bytes, in 512 MiB ones 1.16×). Only the last, partly filled buffer is shrunk to the power of two that
holds its contents. Each tensor becomes a view into a buffer:
``is_pinned()`` is true, and asynchronous copies work as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..units import MiB

__all__ = ["Layout", "layout", "pack", "packed_bytes", "BIN_BYTES", "MAX_BIN_BYTES"]

BIN_BYTES = 64 * MiB
# The largest buffer the packing chooses on its own: a buffer is locked whole before the weights it takes are copied
# and released, so this bounds what packing holds beyond its result (one buffer), against the host's margin.
MAX_BIN_BYTES = 512 * MiB
_ALIGN = 512  # bytes; every tensor starts on a boundary a copy engine likes (and any dtype's element size divides)


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _pow2_ceil(nbytes: int) -> int:
    return 1 << max(0, nbytes - 1).bit_length()


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a unit sits in the unit's contiguous region: byte offsets, and the region's size (a
    multiple of 512 bytes)."""

    offsets: tuple[int, ...]
    nbytes: int


def layout(tensors) -> Layout:
    offsets, end = [], 0
    for tensor in tensors:
        offsets.append(end)
        end += _aligned(_nbytes(tensor))
    return Layout(tuple(offsets), max(end, _ALIGN))


def view_in(region, tensor, offset: int):
    """The view of ``region`` (uint8) at ``offset`` with ``tensor``'s dtype and shape (contiguous)."""
    return region[offset:offset + _nbytes(tensor)].view(tensor.dtype).view(tensor.shape)


def _first_fit(sizes: list[int], bin_bytes: int) -> tuple[list[tuple[int, int]], list[int]]:
    """First-fit packing of regions of ``sizes`` bytes, largest first, into buffers of ``bin_bytes`` (raised to the
    largest region's power of two when that is bigger, and on to the power of two up to :data:`MAX_BIN_BYTES` that
    locks the fewest bytes): each region's (buffer, offset), and the bytes used in each buffer."""
    smallest = max([bin_bytes] + [_pow2_ceil(size) for size in sizes])
    best = None
    capacity = smallest
    while True:
        packed = _fit(sizes, capacity)
        locked = sum(_pow2_ceil(used) for used in packed[1])
        if best is None or locked < best[0]:  # a tie keeps the smaller buffers
            best = (locked, packed)
        if capacity >= MAX_BIN_BYTES:
            return best[1]
        capacity *= 2


def _fit(sizes: list[int], capacity: int) -> tuple[list[tuple[int, int]], list[int]]:
    bins: list[int] = []  # bytes used in each buffer
    where: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        size = sizes[index]
        for b, used in enumerate(bins):
            if used + size <= capacity:
                break
        else:
            bins.append(0)
            b = len(bins) - 1
        where[index] = (b, bins[b])
        bins[b] += size
    return where, bins


def packed_bytes(sizes, bin_bytes: int = BIN_BYTES) -> int:
    """The page-locked bytes :func:`pack` allocates for units whose regions are ``sizes`` bytes (each buffer the
    power of two that holds its contents): what the planner counts as a plan's pinned host memory. Region sizes are
    rounded up to :data:`_ALIGN` here; a unit's region also rounds up each of its tensors, a few hundred bytes each."""
    sizes = [max(_aligned(int(size)), _ALIGN) for size in sizes if size > 0]
    if not sizes:
        return 0
    return sum(_pow2_ceil(used) for used in _first_fit(sizes, bin_bytes)[1])


def pack(groups: list[list], allocate: Callable[[int], object], bin_bytes: int = BIN_BYTES,
         done: Callable[[int, int, object], None] | None = None,
         filled: Callable[[], None] | None = None) -> tuple[list, int]:
    """Copy each group of tensors into one contiguous region of a power-of-two buffer from ``allocate(nbytes)``,
    with as few buffers as first-fit packing of the groups needs.

    Args:
        groups: lists of host tensors of any dtype and shape (a streamed unit's parameters and buffers). Each entry
            is set to None once copied, so that, with ``done`` moving the caller's references to the copy, a source
            can be freed before the next is copied (the host never holds two copies of everything).
        allocate: returns a uint8 tensor of exactly that many bytes (``CopyStreams.host_buffer``).
        bin_bytes: the size of a full buffer; raised to the largest group's power of two when that is bigger.
        done: called as ``done(group, index, copy)`` after each tensor is copied.
        filled: called after each buffer is filled (and its sources dropped): the place to hand freed host memory
            back to the OS (``trim_host_heap``). Page-locked buffers do not come from the heap the sources are
            freed into, so without it the host holds every source and every copy at the end.

    Returns:
        For each group, its region (a uint8 view of :func:`layout`'s size, the copies at the layout's offsets), and
        the bytes allocated in all.
    """
    layouts = [layout(group) for group in groups]
    sizes = [lay.nbytes for lay in layouts]
    where, bins = _first_fit(sizes, bin_bytes)
    regions: list = [None] * len(groups)
    allocated = 0
    for b, used in enumerate(bins):  # one buffer at a time, filled before the next is locked
        buffer = allocate(_pow2_ceil(used))  # a full one: exactly the capacity
        allocated += buffer.numel()
        for g in (i for i, (bin_of, _) in enumerate(where) if bin_of == b):
            start = where[g][1]
            region = buffer[start:start + sizes[g]]
            regions[g] = region
            tensors = groups[g]
            for i, offset in enumerate(layouts[g].offsets):
                view = view_in(region, tensors[i], offset)
                view.copy_(tensors[i])
                tensors[i] = None
                if done is not None:
                    done(g, i, view)
        if filled is not None:
            filled()
    return regions, allocated
