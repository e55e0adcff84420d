"""Host copies of streamed weights packed into page-locked buffers whose sizes are powers of two.

``Tensor.pin_memory()`` allocates through torch's caching host allocator, which rounds every block up to the next
power of two. Pinning a model tensor by tensor therefore locks far more host memory than the weights hold: a
13.1 MB SDXL projection takes 16 MiB, a 26 MB one 32 MiB. Others have measured it at 1.47× to 1.78× the weights
(pytorch/pytorch#95823 and #150517, vllm-project/vllm#56410). On a Colab host with 12.7 GB that decides whether a
plan fits at all. Here the tensors of every streamed unit are packed, largest first, into buffers that are
themselves powers of two (64 MiB, or the largest tensor's power of two if that is bigger), so the allocator has
nothing to round. Only the last, partly filled buffer is shrunk to the power of two that holds its contents.
Each tensor becomes a view into a buffer: ``is_pinned()`` is true, and asynchronous copies work as before.
"""

from __future__ import annotations

from typing import Callable

from ..units import MiB

__all__ = ["pack", "BIN_BYTES"]

BIN_BYTES = 64 * MiB
_ALIGN = 512  # bytes; every tensor starts on a boundary a copy engine likes


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _pow2_ceil(nbytes: int) -> int:
    return 1 << max(0, nbytes - 1).bit_length()


def pack(tensors: list, allocate: Callable[[int], object], bin_bytes: int = BIN_BYTES,
         done: Callable[[int, object], None] | None = None) -> tuple[list, int]:
    """Copy ``tensors`` into as few power-of-two buffers from ``allocate(nbytes)`` as first-fit packing needs.

    Args:
        tensors: host tensors of any dtype and shape. Each entry is set to None once copied, so that, with
            ``done`` moving the caller's references to the copy, a source can be freed before the next is copied
            (the host never holds two copies of everything).
        allocate: returns a uint8 tensor of exactly that many bytes (``Device.host_buffer``).
        bin_bytes: the size of a full buffer; raised to the largest tensor's power of two when that is bigger.
        done: called as ``done(index, copy)`` after each copy.

    Returns:
        The copies, in the order given, each a contiguous view into a buffer with the source's dtype and shape,
        and the bytes allocated in all.
    """
    sizes = [_aligned(_nbytes(t)) for t in tensors]
    capacity = max([bin_bytes] + [_pow2_ceil(size) for size in sizes])
    bins: list[int] = []  # bytes used in each buffer
    where: list[tuple[int, int]] = [(0, 0)] * len(tensors)
    for index in sorted(range(len(tensors)), key=lambda i: -sizes[i]):
        size = sizes[index]
        for b, used in enumerate(bins):
            if used + size <= capacity:
                break
        else:
            bins.append(0)
            b = len(bins) - 1
        where[index] = (b, bins[b])
        bins[b] += size
    copies: list = [None] * len(tensors)
    allocated = 0
    for b, used in enumerate(bins):  # one buffer at a time, filled before the next is locked
        buffer = allocate(_pow2_ceil(max(used, _ALIGN)))  # a full one: exactly the capacity
        allocated += buffer.numel()
        for index in (i for i, (bin_of, _) in enumerate(where) if bin_of == b):
            tensor, offset = tensors[index], where[index][1]
            view = buffer[offset:offset + _nbytes(tensor)].view(tensor.dtype).view(tensor.shape)
            view.copy_(tensor)
            copies[index] = view
            tensors[index] = tensor = None
            if done is not None:
                done(index, view)
    return copies, allocated
