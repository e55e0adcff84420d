"""The pipeline cache: the loaded pipelines by key, the order they were used in, the last result, and room on the GPU.

One :class:`~mlnb.ManagedPipeline` per (model, dtype, memory setting) is kept. Two models rarely fit side by side on
a small card, and a plan made for a budget (or for what auto found free) runs out of memory when another model's
weights still sit in it. So when a load, a planned generation or the OOM rescue needs more than is free, mlnb
unloads other cached pipelines that hold GPU memory, the one used longest ago first, until the need fits (free memory
read again after each), and names each in a warning; when unloading all of them would not be enough, none is
unloaded. Pipelines that hold nothing on the GPU between calls (offloaded levels) stay: unloading them would free no
VRAM. A pipeline generating in another thread (the dashboard's) is never unloaded. A model is unloaded whole, host
copy included: on Colab's 12.7 GB of RAM two models' host copies do not fit either, and loading it again reads its
files.

A cached pipeline answers a load only while it is what was loaded: on the same device (the cache key names it),
whole (its ``pipe`` and every component it was loaded with still there: a user may empty it or set a component to
None), and with its folder's weight files as they were at load (size and modification time); else it is unloaded
with a one-line notice and read again.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from ..monitor import cleanup
from ..units import format_bytes

if TYPE_CHECKING:
    from ..device import Device
    from .result import GenerationResult


class Cached(Protocol):
    """What the cache reads of a pipeline it holds (a :class:`~mlnb.pipeline.managed.ManagedPipeline`)."""

    model: str
    pipe: object
    device: "Device"
    last_used: int

    @property
    def key(self) -> tuple[str, str, str]: ...

    def busy(self) -> bool: ...

    def unload(self) -> None: ...

logger = logging.getLogger(__name__)

__all__ = [
    "add", "find", "device_id", "same_device", "stale", "find_one", "forget", "touch", "cached_pipelines",
    "unload_all", "remember", "last_result",
    "gpu_tensors", "gpu_bytes", "holders", "make_room", "unload_for",
]

_cache: dict[tuple[str, str, str, str], "Cached"] = {}
_lock = threading.RLock()
_uses = itertools.count()  # the order pipelines were loaded or last used in (room unloads the oldest first)
_last: list["GenerationResult"] = []


# ----------------------------------------------------------------------------------------------------------------
# The cached pipelines


@dataclass(frozen=True)
class _Loaded:
    """What a cached pipeline was when it was loaded, for :func:`stale`."""

    weight_files: dict[str, tuple[int, int]] | None  # component/file: (size, mtime ns); None for a hub model
    components: frozenset[str]  # the components it had, besides the optional ones (a safety checker)


_loaded: dict[tuple[str, str, str, str], _Loaded] = {}


def device_id(device: "Device") -> str:
    """The device part of a cache key: a CUDA card by its index, the CPU as one, any other device (a simulated one)
    by its kind and name, else as the object it is."""
    if device.kind == "cpu":
        return "cpu"
    if device.kind == "cuda":
        return f"cuda:{getattr(device, 'index', None)}"
    return f"{device.kind}:{getattr(device, 'name', None) or id(device)}"


def same_device(a: "Device", b: "Device") -> bool:
    """Whether a pipeline loaded for device ``a`` runs on device ``b``."""
    return device_id(a) == device_id(b)


def _key(managed: "Cached") -> tuple[str, str, str, str]:
    return (*managed.key, device_id(managed.device))


def _cached_under(managed: "Cached") -> tuple[str, str, str, str] | None:
    """The key ``managed`` was cached under, found by identity (its device or plan may be replaced since)."""
    return next((key for key, cached in _cache.items() if cached is managed), None)


def add(managed: "Cached", weight_files: dict[str, tuple[int, int]] | None = None) -> None:
    """Cache ``managed`` under its key and device, as the most recently used.

    Args:
        managed: the pipeline just loaded.
        weight_files: its folder's weight files as they were read (:func:`mlnb.pipeline.files.weight_files`); None
            for a hub model.
    """
    pipe = managed.pipe
    optional = set(getattr(pipe, "_optional_components", None) or ())
    components = frozenset(name for name, part in (pipe.components.items() if pipe is not None else ())
                           if part is not None and name not in optional)
    with _lock:
        _cache[_key(managed)] = managed
        _loaded[_key(managed)] = _Loaded(weight_files, components)
    touch(managed)


def find(key: tuple[str, str, str], device: "Device") -> "Cached | None":
    """The pipeline cached under ``key`` for ``device``, or None."""
    with _lock:
        return _cache.get((*key, device_id(device)))


def stale(managed: "Cached") -> str | None:
    """Why a cached pipeline no longer answers a load, or None: it is no longer whole (its ``pipe`` emptied or a
    component set to None since it was loaded), or its folder's weight files changed on disk (size or modification
    time)."""
    from .files import weight_files

    with _lock:
        loaded = _loaded.get(_cached_under(managed))
    pipe = managed.pipe
    if pipe is None:
        return f"{managed.model!r} is no longer whole (its pipe is None)"
    if loaded is None:
        return None
    components = getattr(pipe, "components", None) or {}
    missing = sorted(name for name in loaded.components if components.get(name) is None)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        return f"{managed.model!r} is no longer whole (its {', '.join(missing)} {verb} None)"
    if loaded.weight_files is not None and weight_files(managed.model) != loaded.weight_files:
        return f"weights of {managed.model!r} changed on disk since it was loaded"
    return None


def find_one(matches: Callable[["Cached"], bool]) -> "Cached | None":
    """The first cached pipeline, oldest first, that ``matches``, or None."""
    with _lock:
        return next((m for m in _cache.values() if matches(m)), None)


def forget(managed: "Cached") -> None:
    """Drop ``managed`` from the cache (another pipeline cached under its key since stays)."""
    with _lock:
        key = _cached_under(managed)
        if key is not None:
            del _cache[key]
            _loaded.pop(key, None)


def touch(managed: "Cached") -> None:
    """Make ``managed`` the most recently used: the last to be unloaded to make room."""
    managed.last_used = next(_uses)


def cached_pipelines() -> list["Cached"]:
    """The loaded pipelines, oldest first."""
    with _lock:
        return list(_cache.values())


def unload_all(device: "Device | None" = None) -> int:
    """Unload every cached pipeline and clean up. Returns the number unloaded."""
    from ..device import get_device

    pipes = cached_pipelines()
    for managed in pipes:  # outside the cache's lock: an unload waits for the pipeline's generation to end
        managed.unload()
    cleanup(device or get_device())
    return len(pipes)


def remember(result: "GenerationResult") -> None:
    """Make ``result`` what :func:`last_result` returns."""
    _last[:] = [result]


def last_result() -> "GenerationResult | None":
    """The last :class:`GenerationResult` produced in this process, or None."""
    return _last[-1] if _last else None


# ----------------------------------------------------------------------------------------------------------------
# Room on the GPU


def gpu_tensors(managed: "Cached", device: "Device | None" = None):
    """Each of ``managed``'s weights and buffers that ``device`` (its own by default) holds now, once (nothing when
    it is unloaded)."""
    pipe, device = managed.pipe, device or managed.device
    if pipe is None:
        return
    import torch

    seen: set[int] = set()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in list(component.parameters()) + list(component.buffers()):
                if id(tensor) not in seen and device.owns_tensor(tensor):
                    seen.add(id(tensor))
                    yield tensor


def gpu_bytes(managed: "Cached") -> int:
    """Bytes of ``managed``'s weights and buffers on its GPU now (0 when unloaded, or on a CPU)."""
    if not managed.device.has_memory_counters:
        return 0
    return sum(tensor.numel() * tensor.element_size() for tensor in gpu_tensors(managed))


def _same_card(a: "Device", b: "Device") -> bool:
    """Two device objects for one GPU (a CUDA card by its index; anything else only as the same object)."""
    return a is b or (a.is_cuda and b.is_cuda and getattr(a, "index", None) == getattr(b, "index", None))


def holders(device: "Device", besides: str) -> list[tuple["Cached", int]]:
    """The cached pipelines on ``device``'s card other than model ``besides`` that hold GPU memory and are not
    generating, with their bytes there, the least recently used first."""
    found = []
    for managed in sorted(cached_pipelines(), key=lambda m: m.last_used):
        if managed.model == besides or not _same_card(managed.device, device) or managed.busy:
            continue
        held = gpu_bytes(managed)
        if held > 0:
            found.append((managed, held))
    return found


def unload_for(managed: "Cached", for_model: str, why: str = "") -> bool:
    """Unload ``managed`` to make room for ``for_model``, warning ``why`` first, unless it has started generating in
    another thread since it was found idle (then False: waiting for that generation would hold up this one)."""
    with managed.hold_if_idle() as idle:
        if not idle:
            return False
        if why:
            logger.warning("%s", why)
        managed.unloaded_for, managed.unloaded_why = for_model, f"to make room for {for_model!r}"
        managed.unload()
    return True


def make_room(needed: int, device: "Device", for_model: str) -> list[str]:
    """Unload other pipelines, least recently used first, until ``needed`` bytes are free on ``device`` for
    ``for_model``; returns the models unloaded.

    The allocator's cache is cleared first (memory it holds unused is not free to the driver). Free memory is read
    again after each unload. When unloading every holder would still leave less than ``needed`` free, nothing is
    unloaded: the generation may still fit (a plan's margin), and the OOM rescue unloads them if it does not.
    Nothing happens on a device without memory counters, or when the free memory cannot be read.
    """
    if not device.has_memory_counters or needed <= 0:
        return []
    free = device.free_bytes()
    if free is not None and free < needed:
        device.empty_cache()
        free = device.free_bytes()
    if free is None or free >= needed:
        return []
    found = holders(device, for_model)
    reachable = free + sum(held for _, held in found)
    if reachable < needed:
        if found:
            logger.warning(
                "%s needs %s on the GPU and %s is free: unloading the %d other cached pipeline(s) there would free "
                "%s, not enough; none unloaded", for_model, format_bytes(needed), format_bytes(free), len(found),
                format_bytes(reachable - free),
            )
        return []
    unloaded = []
    for managed, held in found:
        if free >= needed:
            break
        why = (f"unloading {managed.model} ({managed.tag}, {format_bytes(held)} on the GPU) to make room for "
               f"{for_model}: it needs {format_bytes(needed)}, {format_bytes(free)} free")
        if unload_for(managed, for_model, why):
            unloaded.append(managed.model)
        free = device.free_bytes()
        if free is None:
            break
    return unloaded
