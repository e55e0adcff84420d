"""A module's weights packed into one contiguous pinned host region: a streamed unit, or a whole model (the VAE);
or left in the weight files' mapping, where the host RAM cannot hold a pinned copy.

Each tensor of a :class:`PackedUnit` is a view into the unit's host region (:mod:`.pinning`), its *home*. On the GPU
the tensors point at views into device memory (the streamer's ring, or a copy of the unit's own) and are pointed home
again by setting ``.data``: nothing is copied back, since the weights never change on the GPU.

A :class:`MappedUnit` has no host copy of its own: its home is the files' mapping, which every copy to the GPU reads
again, from pageable memory, giving the pages read back to the OS after each copy. It costs no host RAM between
copies, and each copy runs at the pageable bandwidth with the host waiting for it.
"""

from __future__ import annotations

import logging

from .deferred import source_of
from .host_memory import give_back_host_memory, release_pages, weight_file_ranges
from .pinning import layout, pack, view_in

logger = logging.getLogger(__name__)

__all__ = ["PackedUnit", "MappedUnit", "WholeModel", "module_tensors", "pack_into", "pack_home", "pageable",
           "pin_whole", "is_mapped"]

_MAPPED = "_mlnb_mapped"  # on a module streamed from the mapping: streamed again (after a LoRA change) the same way
_SOURCE = "_mlnb_mapped_source"  # on a mapped unit's tensor read in another dtype: the mapped tensor it is cast from


class PackedUnit:
    """One module: its tensors, their host copies (views into one pinned region) and that region.

    ``where`` says what the tensors point at: ``None`` (home), ``"ring"`` (views into the streamer's ring) or
    ``"own"`` (a device copy of the unit's own, made for one run)."""

    def __init__(self, name: str, module) -> None:
        self.name, self.module = name, module
        self.tensors = module_tensors(module)
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


class MappedUnit(PackedUnit):
    """A unit left in its weight files' mapping: its tensors' home is the mapping itself, read again at every copy.

    A tensor read in its files' dtype points at its view of the mapping while at home. One read in another dtype
    (a placeholder of :mod:`.deferred`) is replaced by a CPU stand-in of its dtype and shape that holds no memory (a
    zero-stride view of one element) and keeps its mapped source: it is cast on the host, one tensor at a time, on
    its way to the GPU. Its ``region`` is None: the streamer copies it tensor by tensor (:meth:`fill`), not in one copy. A tensor
    that is not in the mapping (a LoRA's adapter, a buffer made at load) is copied from host memory the same way."""

    def __init__(self, name: str, module) -> None:
        _replace_placeholders(module)
        super().__init__(name, module)
        self.sources = [getattr(tensor, _SOURCE, None) for tensor in self.tensors]
        self.sources = [tensor.data if source is None else source for tensor, source in zip(self.tensors, self.sources)]
        self.home = [tensor.data for tensor in self.tensors]
        self.files = weight_file_ranges()  # the mappings it reads: their pages go back after each copy
        setattr(module, _MAPPED, True)

    def views_into(self, region, rest=None, cut: int | None = None) -> list:
        """Each tensor's contiguous view of ``region`` at its offset in the layout; with ``rest``, the tensors from
        layout offset ``cut`` on are in ``rest`` (a unit split at the ring's end)."""
        views = []
        for home, offset in zip(self.home, self.layout.offsets):
            into = region
            if rest is not None and offset >= cut:
                into, offset = rest, offset - cut
            size = home.element_size()
            views.append(into[offset:offset + home.numel() * size].view(home.dtype).view(home.shape))
        return views

    def fill(self, device, stream, views, after=None, done=None):
        """Copy the unit from the mapping into ``views`` (its tensors' views of device memory) as
        :meth:`mlnb.device.CopyStreams.issue_copy` copies one tensor (on ``stream`` once the compute ``after`` marks
        is done, ``done`` recorded after), casting where the files hold another dtype, then give the pages read back;
        returns what :meth:`~mlnb.device.CopyStreams.wait_copy` takes."""
        handle = done
        for view, source in zip(views, self.sources):
            if source.dtype != view.dtype:
                source = source.to(view.dtype)  # on the host: one tensor's cast at a time
            handle = device.issue_copy(stream, view, source, after=after, done=done)
        release_pages(self.sources, self.files)
        return handle

    def copy_to_own(self, onload_device, device) -> None:
        import torch

        own = torch.empty(self.layout.nbytes, dtype=torch.uint8, device=onload_device)
        views = self.views_into(own)
        self.fill(device, None, views)
        self.point(views, "own")


def _replace_placeholders(module) -> None:
    """Put, in place of each placeholder of ``module`` (:mod:`.deferred`: a ``meta`` tensor, which cannot point at
    host or device memory), a CPU tensor of its dtype and shape that holds no memory (a zero-stride view of one
    element), its mapped source kept on it."""
    import torch

    made: dict[int, object] = {}
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for key, tensor in list(table.items()):
                if tensor is None or tensor.device.type != "meta":
                    continue
                if id(tensor) not in made:
                    source = source_of(tensor)
                    if source is None:
                        continue
                    stand_in = torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)
                    if isinstance(tensor, torch.nn.Parameter):
                        stand_in = torch.nn.Parameter(stand_in, requires_grad=False)
                    setattr(stand_in, _SOURCE, source)
                    made[id(tensor)] = stand_in
                table[key] = made[id(tensor)]


def is_mapped(module) -> bool:
    """Whether ``module`` is a unit streamed from the weight files' mapping."""
    return bool(getattr(module, _MAPPED, False))


def module_tensors(module) -> list:
    """``module``'s parameters and buffers, each once (a tied weight is one tensor), in a fixed order."""
    return list({id(t): t for t in list(module.parameters()) + list(module.buffers())}.values())


def pack_into(units, allocate) -> int:
    """Copy each unit's ``tensors`` into its region (at its ``layout``'s offsets) of packed buffers from ``allocate``
    and point the tensors there, setting each unit's ``region`` and ``home``; returns the bytes allocated."""
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
        return pack_into(units, host_buffer or pageable)
    except RuntimeError as exc:
        logger.warning("could not pin %s (%s); they stay in pageable memory", what, exc)
        return pack_into(units, pageable)


def pageable(nbytes: int):
    """``nbytes`` of plain (pageable) host memory, where the host cannot lock more."""
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

    def __init__(self, module, onload_device, device, host_buffer=None, compute_dtype=None,
                 mapped: bool = False) -> None:
        self.module, self.onload_device, self.device = module, onload_device, device
        self.compute_dtype = compute_dtype
        self.before_onload = None  # called before each copy to the GPU (the denoiser's ring is dropped there)
        if mapped:  # copied from the weight files' mapping each time
            self.unit = MappedUnit("", module)
        else:
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


def pin_whole(module, onload_device, device, host_buffer=None, compute_dtype=None, mapped: bool = False) -> WholeModel:
    """Keep ``module`` (on the host) as a :class:`WholeModel`, onloaded by an accelerate hook when it runs (its
    ``forward``, or a method diffusers decorates with ``apply_forward_hook`` such as a VAE's ``decode``), and cast
    to ``compute_dtype`` on the GPU when given; with ``mapped``, copied from the weight files' mapping each time
    (:class:`MappedUnit`) instead of a pinned copy."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    whole = WholeModel(module, onload_device, device, host_buffer, compute_dtype, mapped)

    class Onload(ModelHook):
        execution_device = onload_device  # read by diffusers' _execution_device

        def pre_forward(self, module, *args, **kwargs):
            whole.onload()
            return args, kwargs

    add_hook_to_module(module, Onload())
    module._mlnb_whole = whole
    return whole
