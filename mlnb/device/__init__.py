"""The device layer: the one package of mlnb that touches ``torch.cuda`` and NVML.

Everything above it asks a :class:`Device` for facts and for cleanup. Queries never raise: a missing GPU, a missing
``nvidia-ml-py`` or an NVML call that fails gives ``None`` (shown as ``N/A``) and ``available=False`` or an
``nvml_error`` string. Tests swap in :class:`mlnb.testing.FakeDevice` with :func:`use_device`.

Its modules, by job:

- :mod:`.interface`: :class:`Device`, :class:`DeviceInfo`, :class:`MemorySnapshot`, out-of-memory detection and
  :class:`CpuDevice`, the N/A case;
- :mod:`.cuda`: :class:`CudaDevice` through ``torch.cuda``;
- :mod:`.nvml`: the lazily initialised NVML session;
- :mod:`.host`: host RAM and this process's RSS;
- :mod:`.streams`: :class:`CopyStreams`, the copy primitives only the weight streamer needs;
- :mod:`.current`: the current device (:func:`get_device`, :func:`set_device`, :func:`use_device`).

All sizes are in bytes.
"""

from __future__ import annotations

from .cuda import CudaCopyStreams, CudaDevice
from .current import get_device, set_device, use_device
from .host import host_memory, host_peak_rss, host_rss
from .interface import CpuDevice, Device, DeviceInfo, MemorySnapshot, is_out_of_memory
from .streams import CopyStreams

__all__ = [
    "DeviceInfo",
    "MemorySnapshot",
    "Device",
    "CpuDevice",
    "CudaDevice",
    "CopyStreams",
    "CudaCopyStreams",
    "is_out_of_memory",
    "get_device",
    "set_device",
    "use_device",
    "host_memory",
    "host_rss",
    "host_peak_rss",
]
