"""Finding what pins memory in a notebook: the namespace, the output cache, a stored traceback.

A notebook keeps objects alive in three places people forget: the output cache (``Out``, ``_``, ``__``, ``_N``),
the frames of the last error's traceback, and their own variables. The walkers here find device tensors in each
(host tensors in a session without a GPU), with the name or path that holds them, and drop the first two on request.
Whatever an object does when looked at (a lazy proxy raising on attribute access), the walkers go on and count it.
"""

from __future__ import annotations

import sys
import types

from ..device import Device
from ..monitor import clear_frames, function_frames
from ..monitor.tensor_walk import (
    HOST_PIN_BYTES, Skipped, TensorRef, find_device_tensors, find_tensors, frame_roots, is_host_tensor, storage_key,
)

__all__ = [
    "tensors_in_namespace",
    "tensors_in_outputs",
    "tensors_in_traceback",
    "tensors_only_in_traceback",
    "clear_pinning_frames",
    "stored_traceback",
    "drop_outputs",
]

_SKIP_NAMES = {"In", "Out", "_oh", "_ih", "_dh", "exit", "quit", "get_ipython", "_", "__", "___"}


def _wanted(device: Device, host: bool):
    return is_host_tensor if host else device.owns_tensor


def tensors_in_namespace(user_ns: dict, device: Device, skipped: Skipped | None = None,
                         host: bool = False) -> list[TensorRef]:
    """Device tensors held by the user's variables (not the output cache).

    Args:
        user_ns: the notebook's namespace.
        device: the device whose tensors count.
        skipped: counts the objects that raised when looked into.
        host: look for host tensors instead (a session without a GPU).
    """
    roots = [
        (name, value) for name, value in list(user_ns.items())
        if type(name) is str and not name.startswith("_") and name not in _SKIP_NAMES
        and not issubclass(type(value), types.ModuleType)
    ]
    return find_tensors(roots, _wanted(device, host), skipped)


def _output_roots(shell) -> list[tuple[str, object]]:
    out = shell.user_ns.get("Out")
    roots = [(f"Out[{n}]", v) for n, v in list(dict.items(out))] if issubclass(type(out), dict) else []
    for name in ("_", "__", "___"):
        value = shell.user_ns.get(name)
        if value is not None and not issubclass(type(value), str):
            roots.append((name, value))
    return roots


def tensors_in_outputs(shell, device: Device, skipped: Skipped | None = None, host: bool = False) -> list[TensorRef]:
    """Device tensors pinned by the output cache (``Out``, ``_``, ``__``, ``___``); ``skipped`` and ``host`` as for
    :func:`tensors_in_namespace`."""
    return find_tensors(_output_roots(shell), _wanted(device, host), skipped)


def tensors_in_traceback(tb, device: Device, skipped: Skipped | None = None, host: bool = False) -> list[TensorRef]:
    """Device tensors held by the locals of a traceback's function frames; ``skipped`` and ``host`` as for
    :func:`tensors_in_namespace`."""
    roots = [root for frame in function_frames(tb) for root in frame_roots(frame)]
    return find_tensors(roots, _wanted(device, host), skipped)


def tensors_only_in_traceback(tb, shell, device: Device, skipped: Skipped | None = None,
                              host: bool = False) -> list[TensorRef]:
    """Device tensors that the traceback's frames alone keep alive: those the namespace or the output cache also
    hold (a model's weights seen through a method's ``self``, a variable seen through IPython's own frame) would stay
    allocated if the frames were cleared, so clearing them would only cost ``%debug`` its locals. ``skipped`` and
    ``host`` as for :func:`tensors_in_namespace`."""
    pinned = tensors_in_traceback(tb, device, skipped, host)
    if not pinned:  # the common case after an error: no walk of the namespace
        return []
    held = {
        r.storage for r in tensors_in_namespace(shell.user_ns, device, skipped, host)
        + tensors_in_outputs(shell, device, skipped, host)
    }
    held |= _cached_weights(device, host)
    return [r for r in pinned if r.storage not in held]


def clear_pinning_frames(tb, pinned: list[TensorRef], device: Device) -> int:
    """Clear the traceback's frames whose locals reach one of the ``pinned`` tensors; the other frames keep their
    locals for ``%debug``. Returns how many were cleared."""
    storages = {r.storage for r in pinned}

    def pins(frame) -> bool:
        return any(r.storage in storages for r in find_device_tensors(frame_roots(frame), device))

    return clear_frames(tb, pins)


def _cached_weights(device: Device, host: bool = False) -> set:
    """Storages of the device weights and buffers (host ones with ``host``) that mlnb's pipeline cache keeps alive (an
    interrupted generation's frames see them through ``self``; the cache would keep them if the frames were
    cleared)."""
    from ..pipeline import cached_pipelines
    from ..pipeline.cache import gpu_tensors

    if host:
        roots = [(managed.model, managed.pipe) for managed in cached_pipelines() if managed.pipe is not None]
        return {r.storage for r in find_tensors(roots, is_host_tensor)}
    return {storage_key(tensor) for managed in cached_pipelines() for tensor in gpu_tensors(managed, device)}


def stored_traceback(shell):
    """The last error's traceback as the shell and ``sys`` keep it, or None."""
    tb = getattr(sys, "last_traceback", None)
    if tb is None:
        result = getattr(shell, "last_execution_result", None)
        exc = getattr(result, "error_in_exec", None)
        tb = getattr(exc, "__traceback__", None)
    return tb


def _pins(name: str, value, device: Device, skipped: Skipped | None) -> bool:
    """Whether an output-cache entry pins memory worth giving back: any device tensor on a GPU; without a GPU,
    :data:`~mlnb.monitor.tensor_walk.HOST_PIN_BYTES` of host tensors."""
    if device.has_memory_counters:
        return bool(find_device_tensors([(name, value)], device, skipped))
    return sum(r.nbytes for r in find_tensors([(name, value)], is_host_tensor, skipped)) >= HOST_PIN_BYTES


def drop_outputs(shell, device: Device, skipped: Skipped | None = None) -> list[str]:
    """Remove output-cache entries that pin device tensors (without a GPU, large host tensors); returns their names
    (``Out[4]``, ``_``...). ``skipped`` counts the objects that raised when looked into.

    Only IPython's own references go: the output cache's entry, its ``_N`` while that is still the entry, and ``_``,
    ``__``, ``___`` while they are still what IPython's displayhook stored. A variable the user bound is never
    touched, whatever its name (``_ = x``, ``_5 = y``, ``Out = {...}``).
    """
    user_ns = shell.user_ns
    hook = getattr(shell, "displayhook", None)
    history = getattr(shell, "history_manager", None)
    out = getattr(history, "output_hist", None) if history is not None else user_ns.get("Out")
    # The displayhook pushes _N, _, __ and ___ with interactive=False: user_ns_hidden holds a second reference to each.
    hidden = getattr(shell, "user_ns_hidden", None) or {}
    dropped: list[str] = []
    pinned_ids = set()
    for n, value in list((out or {}).items()):
        if _pins(f"Out[{n}]", value, device, skipped):
            pinned_ids.add(id(value))
            del out[n]
            for namespace in (user_ns, hidden):
                if namespace.get(f"_{n}") is value:
                    del namespace[f"_{n}"]
            dropped.append(f"Out[{n}]")
    for name in ("_", "__", "___"):
        value = getattr(hook, name, None)  # IPython's own reference; user_ns[name] is one only while it is the same
        if value is None or issubclass(type(value), str):
            continue
        if id(value) in pinned_ids or _pins(name, value, device, skipped):
            setattr(hook, name, "")
            for namespace in (user_ns, hidden):
                if namespace.get(name) is value:
                    namespace[name] = ""
            if id(value) not in pinned_ids:
                dropped.append(name)
    result = getattr(shell, "last_execution_result", None)
    if result is not None and getattr(result, "result", None) is not None and id(result.result) in pinned_ids:
        result.result = None
    return dropped
