"""How many bytes weights take: a module's, or every torch component's of a pipeline, in their current dtype."""

from __future__ import annotations

__all__ = ["module_bytes", "weight_bytes"]


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def weight_bytes(pipe) -> int:
    """Bytes of every parameter and buffer of the pipeline's torch components, in their current dtype."""
    import torch

    return sum(
        module_bytes(component)
        for component in getattr(pipe, "components", {}).values()
        if isinstance(component, torch.nn.Module)
    )
