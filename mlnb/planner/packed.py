"""A module's weights packed into one contiguous pinned host region: a streamed unit, or a whole model (the VAE).

Each tensor of a :class:`PackedUnit` is a view into the unit's host region (:mod:`.pinning`), its *home*. On the GPU
the tensors point at views into device memory (the streamer's ring, or a copy of the unit's own) and are pointed home
again by setting ``.data``: nothing is copied back, since the weights never change on the GPU.
"""

from __future__ import annotations

import logging

from .host_memory import give_back_host_memory
from .pinning import layout, pack, view_in

logger = logging.getLogger(__name__)

__all__ = ["PackedUnit", "WholeModel", "pack_home", "pin_whole"]


class PackedUnit:
    """One module: its tensors, their host copies (views into one pinned region) and that region.

    ``where`` says what the tensors point at: ``None`` (home), ``"ring"`` (views into the streamer's ring) or
    ``"own"`` (a device copy of the unit's own, made for one run)."""

    def __init__(self, name: str, module) -> None:
        self.name, self.module = name, module
        tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
        self.tensors = list(tensors.values())
        self.layout = layout(self.tensors)
        self.region = None  # uint8, on the host
        self.home: list = []  # the host copies, in the order of tensors
        self.where: str | None = None

    @property
    def on_device(self) -> bool:
        return self.where is not None

    def views_into(self, region, rest=None, cut: int | None = None) -> list:
        """Each tensor's view of ``region`` (uint8, the unit's layout size, possibly a stretch of a larger buffer): one
        ``as_strided`` of a typed view of the region per tensor, at the tensor's offset in the layout (``as_strided``
        counts from the start of the storage, not of the view). With ``rest``, the unit is split at the layout offset
        ``cut`` (a tensor's start): ``region`` holds its first ``cut`` bytes and ``rest`` the others."""
        typed: dict = {}
        views = []
        for home, offset in zip(self.home, self.layout.offsets):
            into = region
            if rest is not None and offset >= cut:
                into, offset = rest, offset - cut
            base = typed.get((id(into), home.dtype))
            if base is None:
                base = typed[(id(into), home.dtype)] = into.view(home.dtype)
            views.append(base.as_strided(home.shape, home.stride(),
                                         base.storage_offset() + offset // home.element_size()))
        return views

    def point(self, views, where: str) -> None:
        for tensor, view in zip(self.tensors, views):
            tensor.data = view
        self.where = where

    def point_home(self) -> None:
        for tensor, home in zip(self.tensors, self.home):
            tensor.data = home
        self.where = None

    def copy_to_own(self, onload_device, device) -> None:
        """Copy the unit into device memory of its own, in order on the compute stream, and point at it; the
        memory is freed when the unit points elsewhere."""
        import torch

        own = torch.empty(self.layout.nbytes, dtype=torch.uint8, device=onload_device)
        device.issue_copy(None, own, self.region)
        self.point(self.views_into(own), "own")


def _pack_into(units: list[PackedUnit], allocate) -> int:
    def moved(group: int, index: int, copy) -> None:
        units[group].tensors[index].data = copy

    regions, allocated = pack([list(unit.tensors) for unit in units], allocate, done=moved,
                              filled=give_back_host_memory)
    for unit, region in zip(units, regions):
        unit.region = region
        unit.home = [view_in(region, t, offset) for t, offset in zip(unit.tensors, unit.layout.offsets)]
    return allocated


def pack_home(units: list[PackedUnit], host_buffer=None, what: str = "the streamed weights") -> int:
    """Copy every unit's tensors into its region of packed buffers from ``host_buffer`` and point the tensors there,
    releasing each original as soon as it is copied. After each buffer the host memory given up so far goes back to
    the OS (the heap's free pages, and the pages of the mapped weight files read: without that, the peak holds every
    page of the files beside every pinned copy). Where the host cannot lock that much, the regions are pageable.
    Returns the bytes allocated."""
    try:
        return _pack_into(units, host_buffer or _pageable)
    except RuntimeError as exc:
        logger.warning("could not pin %s (%s); they stay in pageable memory", what, exc)
        return _pack_into(units, _pageable)


def _pageable(nbytes: int):
    import torch

    return torch.empty(nbytes, dtype=torch.uint8)


class WholeModel:
    """A model kept in one packed pinned region on the host and copied to the GPU whole, in one transfer, when it
    runs; sent back by pointing it at its host copy again (nothing is copied back).

    For a VAE: diffusers' ``apply_forward_hook`` calls the accelerate hook's ``pre_forward`` at ``decode``, as it does
    for accelerate's own ``cpu_offload_with_hook``, which moves the module from pageable memory tensor by tensor and
    copies it back to new pageable memory when it is offloaded.

    With ``compute_dtype``, the copy on the GPU is cast to that dtype as it arrives, and dropped as it leaves: an fp16
    SDXL VAE decodes in fp32 so. Left to the pipeline, that cast (``force_upcast``) happens before the decode, while
    the VAE is still on the host: on the host's cores, to new pageable memory, which then crosses to the GPU at twice
    the bytes, and which a fixed host copy could not follow.
    """

    def __init__(self, module, onload_device, device, host_buffer=None, compute_dtype=None) -> None:
        self.module, self.onload_device, self.device = module, onload_device, device
        self.compute_dtype = compute_dtype
        self.before_onload = None  # called before each copy to the GPU (the denoiser's ring is dropped there)
        self.unit = PackedUnit("", module)
        pack_home([self.unit], host_buffer, type(module).__name__)

    @property
    def on_device(self) -> bool:
        return self.unit.on_device

    def onload(self) -> None:
        if not self.unit.on_device:
            if self.before_onload is not None:
                self.before_onload()
            self.unit.copy_to_own(self.onload_device, self.device)
            if self.compute_dtype is not None:
                for tensor in self.unit.tensors:
                    if tensor.is_floating_point():
                        tensor.data = tensor.data.to(self.compute_dtype)

    def offload(self) -> None:
        if self.unit.on_device:
            self.unit.point_home()


def pin_whole(module, onload_device, device, host_buffer=None, compute_dtype=None) -> WholeModel:
    """Keep ``module`` (on the host) as a :class:`WholeModel`, onloaded by an accelerate hook when it runs (its
    ``forward``, or a method diffusers decorates with ``apply_forward_hook`` such as a VAE's ``decode``), and cast
    to ``compute_dtype`` on the GPU when given."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    whole = WholeModel(module, onload_device, device, host_buffer, compute_dtype)

    class Onload(ModelHook):
        execution_device = onload_device  # read by diffusers' _execution_device

        def pre_forward(self, module, *args, **kwargs):
            whole.onload()
            return args, kwargs

    add_hook_to_module(module, Onload())
    module._mlnb_whole = whole
    return whole
