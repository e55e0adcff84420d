"""Finding the tensors a set of objects keeps alive, whatever those objects do when they are looked at.

A notebook's namespace holds anything: lazy proxies whose attribute access loads (or raises), containers whose
``__iter__``, ``__len__`` or ``__eq__`` raise, objects whose ``__class__`` is a property that raises (so even
``isinstance`` fails on them). The walk here runs no code of the objects it visits where it can avoid it: it reads
types with ``type()``, containers through the base class's own C methods (``dict.items``, ``list.copy``), and an
object's attributes from its instance dict. What still raises is skipped and counted in :class:`Skipped`, never
propagated: a memory report must not fail because of one odd object.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Callable, Iterable

__all__ = [
    "HOST_PIN_BYTES",
    "TensorRef",
    "Skipped",
    "find_tensors",
    "find_device_tensors",
    "is_host_tensor",
    "storage_key",
    "frame_roots",
    "frames_pinning",
]

HOST_PIN_BYTES = 16 * 2**20  # host tensors this large are worth freeing in a CPU session; smaller ones are noise
_MAX_DEPTH = 4
_MAX_ITEMS = 2000  # per container; notebooks hold big lists of floats, not of tensors
_MAX_VISITS = 50_000  # objects per search: the per-cell check must stay cheap whatever a cell returns
_ATOMS = (
    str, bytes, bytearray, int, float, complex, bool, type(None), range, memoryview,
    types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.FrameType,
)


@dataclass(frozen=True)
class TensorRef:
    """A tensor and who holds it."""

    path: str  # e.g. "pipe.unet.conv_in.weight", "Out[4]", "traceback: step() local latents"
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    storage: tuple = field(default=(), compare=False, repr=False)  # (data pointer, bytes): one storage, one entry


class Skipped:
    """The objects a walk could not look into (their attribute access, iteration or length raised), counted.

    One instance can be passed to several walks; :meth:`line` says what was skipped in one line.
    """

    def __init__(self) -> None:
        self.count = 0
        self.first = ""  # the first one's type and error, e.g. "LazyProxy (RuntimeError)"
        self._ids: set[int] = set()  # an object met by several walks of one answer is one skipped object

    def add(self, obj, exc: BaseException) -> None:
        if id(obj) in self._ids:
            return
        self._ids.add(id(obj))
        self.count += 1
        if not self.first:
            self.first = f"{_type_name(obj)} ({type(exc).__name__})"

    def __bool__(self) -> bool:
        return self.count > 0

    def line(self) -> str:
        """``skipped 2 object(s) that raised when looked into (first: LazyProxy (RuntimeError))``, or ''."""
        if not self.count:
            return ""
        return f"skipped {self.count} object(s) that raised when looked into (first: {self.first})"


def _type_name(obj) -> str:
    try:
        return str(type(obj).__qualname__)
    except Exception:
        return "object"


def _label(key) -> str:
    """A dict key as a path shows it: ``'latents'``, ``3``; any other key by its type (its ``repr`` may raise)."""
    if type(key) in (str, int, float, bool, bytes, type(None)):
        text = repr(key)
        return text if len(text) <= 60 else text[:59] + "…"
    return f"<{_type_name(key)}>"


def _tensor_type():
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def storage_key(t) -> tuple[int, int]:
    """``(data pointer, bytes)`` of a tensor's storage: views of one storage share it."""
    try:
        storage = t.untyped_storage()
        return (storage.data_ptr(), storage.nbytes()) if storage.data_ptr() else (id(t), t.nbytes)
    except Exception:
        return (id(t), t.element_size() * t.numel())


def is_host_tensor(t) -> bool:
    """A tensor in host memory (not on a GPU, not a meta tensor without storage)."""
    return t.device.type == "cpu"


def _children(obj, cls: type, path: str, module_type: type | None, out: list) -> None:
    """Append ``(path, child)`` for what ``obj`` holds to ``out``, as far as it gets before anything raises."""
    if module_type is not None and issubclass(cls, module_type):
        for name, t in _first(obj.named_parameters(), _MAX_ITEMS):
            out.append((f"{path}.{name}", t))
        for name, t in _first(obj.named_buffers(), _MAX_ITEMS):
            out.append((f"{path}.{name}", t))
        return
    if issubclass(cls, dict):
        for k, v in _first(dict.items(obj), _MAX_ITEMS):
            out.append((f"{path}[{_label(k)}]", v))
        return
    if issubclass(cls, (list, tuple, set, frozenset)):
        if issubclass(cls, list):
            items = list.copy(obj)
        elif issubclass(cls, tuple):
            items = tuple.__getitem__(obj, slice(0, _MAX_ITEMS))
        else:
            items = set(obj)  # a set's own table: its __iter__ is not called
        for i, v in enumerate(_first(items, _MAX_ITEMS)):
            out.append((f"{path}[{i}]", v))
        return
    try:
        attrs = object.__getattribute__(obj, "__dict__")
    except AttributeError:  # __slots__ or a builtin: nothing named to walk
        return
    if issubclass(type(attrs), dict):
        for name, v in _first(dict.items(attrs), _MAX_ITEMS):
            if type(name) is not str:
                out.append((f"{path}.{_label(name)}", v))
            elif not name.startswith("__"):
                out.append((f"{path}.{name}", v))


def _first(items: Iterable, n: int):
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


def find_tensors(
    roots: Iterable[tuple[str, object]],
    wanted: Callable[[object], bool],
    skipped: Skipped | None = None,
    spared: frozenset | set = frozenset(),
    visited: set[int] | None = None,
) -> list[TensorRef]:
    """Tensors reachable from ``roots`` (``(name, object)`` pairs) for which ``wanted(tensor)`` is true, largest
    first, each storage once.

    Walks containers, ``nn.Module`` parameters and buffers, and plain objects' attributes, to a bounded depth. An
    object that raises when looked into is skipped and counted in ``skipped``.

    Args:
        roots: the names and objects to start from.
        wanted: which tensors count, e.g. ``device.owns_tensor`` or :func:`is_host_tensor`.
        skipped: where to count the objects skipped (a fresh counter when None).
        spared: storage keys (:func:`storage_key`) held elsewhere, left out of the answer.
        visited: ids of objects not to walk into (what an earlier walk already saw), filled with this walk's.
    """
    tensor_type = _tensor_type()
    if tensor_type is None:  # torch never imported: no tensor exists
        return []
    skipped = skipped if skipped is not None else Skipped()
    module_type = getattr(sys.modules.get("torch.nn"), "Module", None)
    found: dict[tuple[int, int], TensorRef] = {}
    visited = visited if visited is not None else set()
    budget = [_MAX_VISITS]

    def visit(obj, path: str, depth: int) -> None:
        budget[0] -= 1
        cls = type(obj)
        if issubclass(cls, tensor_type):
            try:
                if wanted(obj):
                    key = storage_key(obj)
                    if key not in found and key not in spared:
                        dtype = str(obj.dtype).replace("torch.", "")
                        found[key] = TensorRef(path, key[1], tuple(obj.shape), dtype, key)
            except Exception as exc:
                skipped.add(obj, exc)
            return
        if depth >= _MAX_DEPTH or budget[0] <= 0 or id(obj) in visited or issubclass(cls, _ATOMS):
            return
        visited.add(id(obj))
        children: list[tuple[str, object]] = []
        try:
            _children(obj, cls, path, module_type, children)
        except Exception as exc:  # what was found before it raised is still walked
            skipped.add(obj, exc)
        for child_path, child in children:
            visit(child, child_path, depth + 1)

    for name, obj in roots:
        visit(obj, name, 0)
    return sorted(found.values(), key=lambda r: r.nbytes, reverse=True)


def find_device_tensors(roots: Iterable[tuple[str, object]], device, skipped: Skipped | None = None) -> list[TensorRef]:
    """:func:`find_tensors` for the tensors ``device`` holds (they pin its memory while referenced)."""
    return find_tensors(roots, device.owns_tensor, skipped)


def frame_roots(frame) -> list[tuple[str, object]]:
    """A frame's locals as walk roots, named ``traceback: step() local latents``."""
    name = frame.f_code.co_name
    return [(f"traceback: {name}() local {local}", value) for local, value in list(frame.f_locals.items())]


def frames_pinning(device, spare: Iterable[object] = ()) -> Callable[[object], bool]:
    """Which frames an error's traceback should give up its locals for: a frame pins memory when its locals reach a
    tensor on ``device``'s GPU, or without a GPU, :data:`HOST_PIN_BYTES` of host tensors. The tensors reachable from
    ``spare`` (a pipeline the cache keeps) do not count: clearing a frame would not free them. Every other frame keeps
    its locals for ``%debug`` (a user's step callback that raised, holding only small host latents).

    Args:
        device: the device whose memory counts.
        spare: objects whose tensors are held elsewhere.
    """
    on_gpu = bool(getattr(device, "has_memory_counters", False))
    wanted = device.owns_tensor if on_gpu else is_host_tensor
    least = 1 if on_gpu else HOST_PIN_BYTES
    held: set[int] = set()  # what the spared objects reach: a frame's `self` is not walked again
    spared = {r.storage for r in find_tensors([("spare", obj) for obj in spare], wanted, visited=held)}

    def pins(frame) -> bool:
        found = find_tensors(frame_roots(frame), wanted, spared=spared, visited=set(held))
        return sum(r.nbytes for r in found) >= least

    return pins
