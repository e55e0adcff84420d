"""mlnb: run diffusion models on small GPUs from a notebook.

``%load_ext mlnb`` registers ``%%generate`` and ``%vram`` and watches every cell's GPU memory. From plain Python::

    import mlnb
    pipe = mlnb.load_pipeline("stabilityai/stable-diffusion-xl-base-1.0", level="auto")
    result = pipe.generate("a watercolor fox", steps=20, seed=1)

``import mlnb`` is light: torch, diffusers and ipywidgets load on first use.
"""

from __future__ import annotations

import importlib

from .version import __version__

# public name -> module that defines it (imported on first access)
_LAZY = {
    "OptimizationLevel": "mlnb.levels",
    "MemoryOptimizationConfig": "mlnb.levels",
    "Technique": "mlnb.levels",
    "choose_level": "mlnb.levels",
    "MemorySetting": "mlnb.setting",
    "MemoryOptimizer": "mlnb.optimizer",
    "OptimizationReport": "mlnb.optimizer",
    "TechniqueResult": "mlnb.optimizer",
    "MemoryMonitor": "mlnb.monitor",
    "MemoryReport": "mlnb.monitor",
    "load_pipeline": "mlnb.pipeline",
    "ManagedPipeline": "mlnb.pipeline",
    "GenerationResult": "mlnb.pipeline",
    "last_result": "mlnb.pipeline",
    "unload_all": "mlnb.pipeline",
    "dashboard": "mlnb.widgets",
    "get_device": "mlnb.device",
    "DeviceInfo": "mlnb.device",
}

__all__ = sorted(_LAZY) + ["load_ipython_extension", "unload_ipython_extension", "testing", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "testing":
        return importlib.import_module("mlnb.testing")
    raise AttributeError(f"module 'mlnb' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


def load_ipython_extension(ipython) -> None:
    """``%load_ext mlnb``: register the magics and the per-cell memory hooks."""
    from .ipython import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext mlnb``: remove exactly what loading added."""
    from .ipython import unload_ipython_extension as unload

    unload(ipython)
