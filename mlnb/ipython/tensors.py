"""Finding what pins GPU memory in a notebook: the namespace, the output cache, a stored traceback.

A notebook keeps objects alive in three places people forget: the output cache (``Out``, ``_``, ``__``, ``_N``),
the frames of the last error's traceback, and their own variables. The walkers here find device tensors in each,
with the name or path that holds them, and drop the first two on request.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

from ..device import Device
from ..monitor import function_frames

__all__ = [
    "TensorRef",
    "find_device_tensors",
    "tensors_in_namespace",
    "tensors_in_outputs",
    "tensors_in_traceback",
    "tensors_only_in_traceback",
    "drop_outputs",
]

_MAX_DEPTH = 4
_MAX_ITEMS = 2000  # per container; notebooks hold big lists of floats, not of tensors
_MAX_VISITS = 50_000  # objects per search: the per-cell check must stay cheap whatever a cell returns
_SKIP_NAMES = {"In", "Out", "_oh", "_ih", "_dh", "exit", "quit", "get_ipython", "_", "__", "___"}


@dataclass(frozen=True)
class TensorRef:
    """A device tensor and who holds it."""

    path: str  # e.g. "pipe.unet.conv_in.weight", "Out[4]", "traceback: step() local latents"
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    storage: tuple = field(default=(), compare=False, repr=False)  # (data pointer, bytes): one storage, one entry


def _tensor_type():
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def _storage_key(t) -> tuple[int, int]:
    try:
        storage = t.untyped_storage()
        return (storage.data_ptr(), storage.nbytes()) if storage.data_ptr() else (id(t), t.nbytes)
    except Exception:
        return (id(t), t.element_size() * t.numel())


def find_device_tensors(roots: list[tuple[str, object]], device: Device) -> list[TensorRef]:
    """Device tensors reachable from ``roots`` (``(name, object)`` pairs), largest first, each storage once.

    Walks containers, ``nn.Module`` parameters and buffers, and plain objects' attributes, to a bounded depth.
    """
    tensor_type = _tensor_type()
    if tensor_type is None:  # torch never imported: nothing can pin the GPU
        return []
    found: dict[tuple[int, int], TensorRef] = {}
    visited: set[int] = set()
    module_type = getattr(sys.modules.get("torch.nn"), "Module", None)

    budget = [_MAX_VISITS]

    def visit(obj, path: str, depth: int) -> None:
        budget[0] -= 1
        if isinstance(obj, tensor_type):
            if device.owns_tensor(obj):
                key = _storage_key(obj)
                if key not in found:
                    found[key] = TensorRef(path, key[1], tuple(obj.shape), str(obj.dtype).replace("torch.", ""), key)
            return
        if depth >= _MAX_DEPTH or id(obj) in visited or budget[0] <= 0:
            return
        if isinstance(obj, (str, bytes, int, float, bool, type(None), types.ModuleType, type, types.FunctionType)):
            return
        visited.add(id(obj))
        if module_type is not None and isinstance(obj, module_type):
            for name, t in list(obj.named_parameters())[:_MAX_ITEMS] + list(obj.named_buffers())[:_MAX_ITEMS]:
                visit(t, f"{path}.{name}", depth + 1)
            return
        if isinstance(obj, dict):
            for i, (k, v) in enumerate(list(obj.items())):
                if i >= _MAX_ITEMS:
                    break
                visit(v, f"{path}[{k!r}]", depth + 1)
            return
        if isinstance(obj, (list, tuple, set, frozenset)):
            for i, v in enumerate(list(obj)):
                if i >= _MAX_ITEMS:
                    break
                visit(v, f"{path}[{i}]", depth + 1)
            return
        attrs = getattr(obj, "__dict__", None)
        if isinstance(attrs, dict):
            for name, v in list(attrs.items())[:_MAX_ITEMS]:
                if not name.startswith("__"):
                    visit(v, f"{path}.{name}", depth + 1)

    for name, obj in roots:
        visit(obj, name, 0)
    return sorted(found.values(), key=lambda r: r.nbytes, reverse=True)


def tensors_in_namespace(user_ns: dict, device: Device) -> list[TensorRef]:
    """Device tensors held by the user's variables (not the output cache)."""
    roots = [
        (name, value) for name, value in list(user_ns.items())
        if not name.startswith("_") and name not in _SKIP_NAMES and not isinstance(value, types.ModuleType)
    ]
    return find_device_tensors(roots, device)


def _output_roots(shell) -> list[tuple[str, object]]:
    roots = [(f"Out[{n}]", v) for n, v in list(shell.user_ns.get("Out", {}).items())]
    for name in ("_", "__", "___"):
        value = shell.user_ns.get(name)
        if value is not None and not isinstance(value, str):
            roots.append((name, value))
    return roots


def tensors_in_outputs(shell, device: Device) -> list[TensorRef]:
    """Device tensors pinned by the output cache (``Out``, ``_``, ``__``, ``___``)."""
    return find_device_tensors(_output_roots(shell), device)


def tensors_in_traceback(tb, device: Device) -> list[TensorRef]:
    """Device tensors held by the locals of a traceback's function frames."""
    roots = []
    for frame in function_frames(tb):
        for name, value in list(frame.f_locals.items()):
            roots.append((f"traceback: {frame.f_code.co_name}() local {name}", value))
    return find_device_tensors(roots, device)


def tensors_only_in_traceback(tb, shell, device: Device) -> list[TensorRef]:
    """Device tensors that the traceback's frames alone keep alive: those the namespace or the output cache also
    hold (a model's weights seen through a method's ``self``, a variable seen through IPython's own frame) would stay
    allocated if the frames were cleared, so clearing them would only cost ``%debug`` its locals."""
    pinned = tensors_in_traceback(tb, device)
    if not pinned:  # the common case after an error: no walk of the namespace
        return []
    held = {r.storage for r in tensors_in_namespace(shell.user_ns, device) + tensors_in_outputs(shell, device)}
    held |= _cached_weights(device)
    return [r for r in pinned if r.storage not in held]


def _cached_weights(device: Device) -> set:
    """Storages of the device weights and buffers that mlnb's pipeline cache keeps alive (an interrupted generation's
    frames see them through ``self``; the cache would keep them allocated if the frames were cleared)."""
    from ..pipeline import cached_pipelines
    from ..pipeline.cache import gpu_tensors

    return {_storage_key(tensor) for managed in cached_pipelines() for tensor in gpu_tensors(managed, device)}


def stored_traceback(shell):
    """The last error's traceback as the shell and ``sys`` keep it, or None."""
    tb = getattr(sys, "last_traceback", None)
    if tb is None:
        result = getattr(shell, "last_execution_result", None)
        exc = getattr(result, "error_in_exec", None)
        tb = getattr(exc, "__traceback__", None)
    return tb


def drop_outputs(shell, device: Device) -> list[str]:
    """Remove output-cache entries that pin device tensors; returns their names (``Out[4]``, ``_``...).

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
        if find_device_tensors([(f"Out[{n}]", value)], device):
            pinned_ids.add(id(value))
            del out[n]
            for namespace in (user_ns, hidden):
                if namespace.get(f"_{n}") is value:
                    del namespace[f"_{n}"]
            dropped.append(f"Out[{n}]")
    for name in ("_", "__", "___"):
        value = getattr(hook, name, None)  # IPython's own reference; user_ns[name] is one only while it is the same
        if value is None or isinstance(value, str):
            continue
        if id(value) in pinned_ids or find_device_tensors([(name, value)], device):
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
