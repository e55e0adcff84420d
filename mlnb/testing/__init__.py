"""Helpers for tests, the demo and the notebooks: tiny random-weight pipelines and a simulated GPU.

- :func:`tiny_pipeline` / :func:`default_tiny_model`: tiny diffusers pipelines saved to disk (there is no hub here);
- :func:`tiny_lora`: a tiny random LoRA for them, saved as safetensors (or pickle);
- :class:`FakeDevice`: a GPU simulated on the CPU, with :class:`FakeOutOfMemoryError` as its out-of-memory error.

No module of the library imports this package. Importing it is light: the fake device (which needs torch) loads on
first access.

Example:
    ```python
    >>> from mlnb.device import use_device
    >>> from mlnb.testing import FakeDevice, tiny_pipeline
    >>> folder = tiny_pipeline("sd")
    >>> with use_device(FakeDevice(total=4 * 2**30, cuda_like=True)):
    ...     ...
    ```
"""

from __future__ import annotations

import importlib

from ..tiny import TINY_KINDS, default_tiny_model, tiny_pipeline
from .loras import tiny_lora

__all__ = ["tiny_pipeline", "default_tiny_model", "tiny_lora", "TINY_KINDS", "FakeDevice", "FakeOutOfMemoryError"]

_LAZY = {"FakeDevice": "mlnb.testing.fake_device", "FakeOutOfMemoryError": "mlnb.testing.fake_device"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlnb.testing' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
