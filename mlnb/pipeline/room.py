"""Room on the GPU for the pipeline in use: other cached pipelines' GPU weights go, the least recently used first.

Two models rarely fit side by side on a small card, and a plan made for a budget (or for what auto found free) runs
out of memory when another model's weights still sit in it. So when a load, a planned generation or the OOM rescue
needs more than is free, mlnb unloads other cached pipelines that hold GPU memory, the one used longest ago first,
until the need fits, and names each in a warning. Pipelines that hold nothing on the GPU between calls (offloaded
levels) stay: unloading them would free no VRAM. A pipeline generating in another thread (the dashboard's) is
never unloaded. A model is unloaded whole, host copy included: on Colab's 12.7 GB of RAM two models' host copies
do not fit either, and loading it again reads its files.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..units import format_bytes

if TYPE_CHECKING:
    from ..device import Device
    from .managed import ManagedPipeline

logger = logging.getLogger(__name__)

__all__ = ["gpu_bytes", "holders", "to_unload", "make_room"]


def gpu_bytes(managed: "ManagedPipeline") -> int:
    """Bytes of ``managed``'s weights and buffers on its GPU now (0 when unloaded, or on a CPU)."""
    pipe, device = managed.pipe, managed.device
    if pipe is None or not device.has_memory_counters:
        return 0
    import torch

    seen: set[int] = set()
    total = 0
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in list(component.parameters()) + list(component.buffers()):
            if id(tensor) not in seen and device.owns_tensor(tensor):
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def _busy(managed: "ManagedPipeline") -> bool:
    """Generating in another thread (the current thread's own generation does not count)."""
    if not managed._generating.acquire(blocking=False):
        return True
    managed._generating.release()
    return False


def holders(device: "Device", besides: str) -> list[tuple["ManagedPipeline", int]]:
    """The cached pipelines on ``device`` other than model ``besides`` that hold GPU memory and are not generating,
    with their bytes there, the least recently used first."""
    from .managed import cached_pipelines

    found = []
    for managed in sorted(cached_pipelines(), key=lambda m: m.last_used):
        if managed.model == besides or managed.device is not device or _busy(managed):
            continue
        held = gpu_bytes(managed)
        if held > 0:
            found.append((managed, held))
    return found


def to_unload(needed: int, free: int, held: list[int]) -> int:
    """How many of the holders (their bytes in ``held``, in unloading order) must go so that ``needed`` bytes are
    free: the fewest that reach it, or all of them when even that does not."""
    count = 0
    while free < needed and count < len(held):
        free += held[count]
        count += 1
    return count


def make_room(needed: int, device: "Device", for_model: str) -> list[str]:
    """Unload other pipelines, least recently used first, until ``needed`` bytes are free on ``device`` for
    ``for_model``; returns the models unloaded. Nothing happens on a device without memory counters."""
    if not device.has_memory_counters or needed <= 0:
        return []
    free = device.free_bytes()
    if free is None or free >= needed:
        return []
    found = holders(device, for_model)
    count = to_unload(needed, free, [held for _, held in found])
    unloaded = []
    for managed, held in found[:count]:
        logger.warning(
            "unloading %s (%s, %s on the GPU) to make room for %s: it needs %s, %s free",
            managed.model, managed.tag, format_bytes(held), for_model, format_bytes(needed), format_bytes(free),
        )
        managed.unload()
        unloaded.append(managed.model)
    if unloaded:
        free = device.free_bytes() or 0
        if free < needed:
            logger.warning("%s free after unloading, less than the %s %s needs", format_bytes(free),
                           format_bytes(needed), for_model)
    return unloaded
