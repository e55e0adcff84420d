"""Weights left in their files' mapping until they are placed, cast to their storage dtype on the way.

A model read from safetensors in its files' own dtype holds views of the mapped files: nothing of it is in host RAM
until a page is read. Cast on the host when it is read (what ``from_pretrained(torch_dtype=...)`` does when the files
hold another dtype: a bf16 Flux read as fp16 for a card without bf16, fp32 files read as fp16), the whole model is
copied into new host memory first, which Colab's 12.7 GB cannot hold for Flux.

:func:`defer` puts a placeholder in place of each such tensor instead: a ``meta`` tensor of the storage dtype (so
sizes, dtypes and the plan are those of the model as it will be placed) that holds the mapped tensor. Placing a part
(:func:`materialize`) casts its tensors one at a time straight to where they go (the GPU, or the host for a part that
is pinned or offloaded): the host holds one tensor's cast at a time beside what it keeps, and the mapped pages read
are given back by the caller as the parts move (:func:`mlnb.planner.host_memory.release_mapped_weights`).

A placeholder shared by two modules (tied weights) becomes one tensor wherever it is placed first.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["defer", "materialize", "deferred_bytes", "is_deferred", "source_of"]

_SOURCE = "_mlnb_source"  # on a placeholder: the mapped tensor it stands for
_MADE = "_mlnb_made"  # on a placeholder once placed: what it became (for the other modules that share it)


def _placeholder(source, dtype, parameter: bool):
    import torch

    empty = torch.empty(source.shape, dtype=dtype, device="meta")
    holder = torch.nn.Parameter(empty, requires_grad=False) if parameter else empty
    setattr(holder, _SOURCE, source)
    return holder


def defer(module, dtype_of: Callable[[str, object], object], same: bool = False) -> int:
    """Replace each tensor of ``module`` whose storage dtype differs from its own by a placeholder.

    Args:
        module: a model read in its files' dtype (its tensors views of the mapped files).
        dtype_of: ``dtype_of(name, tensor)`` -> the dtype ``name`` is stored in once placed, or None to leave it.
        same: also a tensor stored in its own dtype, so that a cast decided later (fp8 storage, which casts the
            placeholder's dtype) happens as the tensor is placed, not on the host beforehand.

    Returns:
        The bytes deferred, in the storage dtype.
    """
    made: dict[int, object] = {}
    deferred = 0
    for prefix, sub in module.named_modules():
        for kind, table in (("parameter", sub._parameters), ("buffer", sub._buffers)):
            for name, tensor in list(table.items()):
                if tensor is None or not tensor.is_floating_point() or tensor.device.type == "meta":
                    continue
                if id(tensor) in made:
                    table[name] = made[id(tensor)]
                    continue
                dtype = dtype_of(f"{prefix}.{name}" if prefix else name, tensor)
                if dtype is None or (dtype == tensor.dtype and not same):
                    continue
                holder = _placeholder(tensor.detach(), dtype, kind == "parameter")
                made[id(tensor)] = table[name] = holder
                deferred += tensor.numel() * holder.element_size()
    return deferred


def _is_placeholder(tensor) -> bool:
    return tensor is not None and (hasattr(tensor, _SOURCE) or hasattr(tensor, _MADE))


def source_of(tensor):
    """The mapped tensor a placeholder stands for (in its files' dtype), or None for any other tensor."""
    return getattr(tensor, _SOURCE, None)


def is_deferred(module) -> bool:
    """Whether any tensor of ``module`` is still a placeholder."""
    return any(_is_placeholder(t) for t in list(module.parameters()) + list(module.buffers()))


def deferred_bytes(module) -> int:
    """The bytes of ``module`` still deferred, in their storage dtype."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if hasattr(tensor, _SOURCE) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _made(holder, device):
    """The placed tensor of ``holder``: cast from its mapped source onto ``device`` (once; the source is dropped)."""
    import torch

    placed = getattr(holder, _MADE, None)
    if placed is None:
        source = getattr(holder, _SOURCE)
        data = source.to(device=device, dtype=holder.dtype)
        placed = torch.nn.Parameter(data, requires_grad=False) if isinstance(holder, torch.nn.Parameter) else data
        delattr(holder, _SOURCE)  # the mapping's pages go once nothing views them
        setattr(holder, _MADE, placed)
    return placed


def materialize(module, device, recurse: bool = True, each_part: Callable[[int], None] | None = None) -> int:
    """Place ``module``'s placeholders on ``device`` (a ``torch.device`` or name), each cast from its mapped source
    as it goes; tensors that are not placeholders are left where they are.

    Args:
        module: a module, part of a model :func:`defer` ran on.
        device: where the tensors go (``"cpu"`` for a part kept or pinned on the host).
        recurse: also its submodules (else only its own tensors).
        each_part: called with the bytes of each tensor placed (the caller gives the mapped pages back as they add
            up).

    Returns:
        The bytes placed.
    """
    placed = 0
    modules = module.modules() if recurse else [module]
    for sub in modules:
        for table in (sub._parameters, sub._buffers):
            for name, tensor in list(table.items()):
                if not _is_placeholder(tensor):
                    continue
                fresh = hasattr(tensor, _SOURCE)
                table[name] = _made(tensor, device)
                if fresh:
                    nbytes = tensor.numel() * tensor.element_size()
                    placed += nbytes
                    if each_part is not None:
                        each_part(nbytes)
    return placed
