"""Streaming a plan's units (denoiser blocks, text encoder parts) from pinned host memory through GPU slots.

Each streamed unit's weights live on the host in one contiguous page-locked region (:mod:`.pinning`). On the GPU
there are two slots (or as many as the plan says), each the size of the largest unit, allocated when the model's
forward starts. A text encoder's are released when its forward ends; the denoiser's are kept from one step to the
next (``keep_slots``) and released when the VAE starts decoding, the next image's encoders start, or a managed
generation ends. After the first forward, which records the order in which the units run, the units take the slots
in turn (unit ``p`` in slot ``p mod slots``):

- the forward starts by issuing the copies of the first units, one per slot (with kept slots, the forward before
  issued them: see below);
- a unit, as it starts, makes the compute stream wait for its own copy (an event: the host does not wait) and
  points its parameters at its slot;
- a unit, as it ends, points its parameters back at the host copy and issues the copy of the unit ``slots`` places
  after it into the slot it has just used, once the compute queued so far (its own kernels) is done. With kept
  slots, a slot's last unit of the forward issues the next forward's first unit for that slot instead, which then
  arrives during the rest of this forward, the scheduler's step and the next forward's first resident blocks.

A unit therefore arrives while everything between the end of the unit ``slots`` places before it and its own start
computes: the units in between and every resident block around them. Each copy is one transfer of the whole unit on a
copy stream (:meth:`mlnb.device.CopyStreams.issue_copy`). The host never waits for the GPU, and the streaming allocates
and frees nothing between the forward's start and end (with kept slots, nothing between one image's first step and
its decode), so it gives the allocator no reason to free cached memory under a cap (which synchronises the device)
in the middle of a step.
At most ``slots`` units are on the GPU at once, the planner's ``slots × largest streamed block``.

The hooks are diffusers' (a ``ModelHook`` in the unit's ``HookRegistry``, under group offloading's name, so the
pipeline finds the onload device and refuses a second offloading as it does for its own), but not diffusers' group
offloading itself: its hook waits on the host for the compute stream at every offload (without ``record_stream``)
and for the copy stream at every onload, allocates every tensor of a unit on the copy stream's pool and frees it
into that pool, and issues one copy per tensor, so its copies do not overlap the compute (``docs/benchmarks.md``).

A unit that runs twice in one forward, or not at all, leaves the order unrecorded. Every unit then copies blocking
into memory of its own when it runs, which is correct and slower; a warning says so. So does a unit that runs
outside the order in a later forward.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

from .host_memory import give_back_host_memory
from .pinning import layout, pack, view_in

logger = logging.getLogger(__name__)

__all__ = ["UnitStreamer", "WholeModel", "pin_whole", "stream_units", "streamer_of", "streamers_of", "module_streamer"]


class _Unit:
    """One streamed module: its tensors, their host copies (views into one pinned region) and that region."""

    def __init__(self, name: str, module) -> None:
        self.name, self.module = name, module
        tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
        self.tensors = list(tensors.values())
        self.layout = layout(self.tensors)
        self.region = None  # uint8, on the host
        self.home: list = []  # the host copies, in the order of tensors
        self.on_device = False
        self._views: dict = {}  # slot index -> this unit's views into that slot, while the slot lives

    def point_to(self, region, slot: int | None = None) -> None:
        """Point every tensor at its place in ``region`` (uint8, a multiple of 512 bytes long). The views are one
        ``as_strided`` of a typed view of the region per tensor; into a kept slot (``slot``) they are made once."""
        views = self._views.get(slot) if slot is not None else None
        if views is None:
            typed: dict = {}
            views = []
            for home, offset in zip(self.home, self.layout.offsets):
                base = typed.get(home.dtype)
                if base is None:
                    base = typed[home.dtype] = region.view(home.dtype)
                views.append(base.as_strided(home.shape, home.stride(), offset // home.element_size()))
            if slot is not None:
                self._views[slot] = views
        for tensor, view in zip(self.tensors, views):
            tensor.data = view
        self.on_device = True

    def forget_views(self) -> None:
        self._views = {}

    def point_home(self) -> None:
        for tensor, home in zip(self.tensors, self.home):
            tensor.data = home
        self.on_device = False

    def copy_to_own(self, onload_device, device) -> None:
        """Copy the unit into device memory of its own, in order on the compute stream, and point at it; the
        memory is freed when the unit goes home."""
        import torch

        own = torch.empty(self.layout.nbytes, dtype=torch.uint8, device=onload_device)
        device.issue_copy(None, own, self.region)
        self.point_to(own)


def _hook_type():
    from diffusers.hooks import ModelHook

    class StreamHook(ModelHook):
        """Brings one unit to the GPU before its forward and sends it home after."""

        _is_stateful = False

        def __init__(self, streamer: "UnitStreamer", unit: _Unit, onload_device) -> None:
            super().__init__()
            self.streamer, self.unit = streamer, unit
            self.config = SimpleNamespace(onload_device=onload_device)  # read by diffusers' _execution_device

        def pre_forward(self, module, *args, **kwargs):
            self.streamer._enter(self.unit)
            return args, kwargs

        def post_forward(self, module, output):
            self.streamer._leave(self.unit)
            return output

    return StreamHook


class UnitStreamer:
    """The streamed units of one model (a denoiser or a text encoder), its slots and the order of its units."""

    def __init__(self, model, units: list[_Unit], onload_device, device, stream, keep_slots: bool = False,
                 slots: int = 2) -> None:
        if slots < 2:
            raise ValueError(f"streaming needs at least two slots (one computing, one arriving), got {slots}")
        self.units = {unit.name: unit for unit in units}
        self.onload_device, self.device, self.stream = onload_device, device, stream
        self.keep_slots = keep_slots
        self.slot_count = slots
        self.order: list[str] | None = None  # execution order, once recorded
        self.slot_bytes = max(unit.layout.nbytes for unit in units)
        self._position: dict[str, int] = {}
        self._trace: list[str] = []
        self._tracing = True
        self._slots: list | None = None  # the device regions (kept between forwards with keep_slots)
        self._pending: dict[int, object] = {}  # position -> its copy, issued and not yet waited for
        # Called with a unit's name once the compute stream may run it (its copy waited for): the block timer marks
        # there, to tell a streamed block's wait from its compute.
        self.on_ready = None
        self._handles = [model.register_forward_pre_hook(self._before), model.register_forward_hook(self._after)]

    @property
    def chained(self) -> bool:
        """Whether units are prefetched into the slots (the order is recorded)."""
        return self.order is not None

    def host_copies(self) -> list:
        """Every host copy of every unit (views into the pinned regions)."""
        return [home for unit in self.units.values() for home in unit.home]

    # -- what it holds now (read-only) -----------------------------------------------------------------------------

    @property
    def slots_in_use(self) -> int:
        """GPU slots allocated now: during a forward, and between forwards with kept slots; 0 once released."""
        return len(self._slots) if self._slots is not None else 0

    def slot_regions(self) -> tuple:
        """The slots' device memory (uint8, :attr:`slot_bytes` each) in slot order; empty while none is allocated."""
        return tuple(self._slots) if self._slots is not None else ()

    @property
    def pending_copies(self) -> frozenset[int]:
        """Positions (in the recorded order) of the units whose copies are issued and not yet waited for: with kept
        slots, between forwards, the next forward's first units."""
        return frozenset(self._pending)

    def units_on_device(self) -> tuple[str, ...]:
        """The units whose weights point at device memory now (a slot, or a copy of their own while they run)."""
        return tuple(name for name, unit in self.units.items() if unit.on_device)

    # -- one forward -----------------------------------------------------------------------------------------------

    def _before(self, module, args) -> None:
        if self._tracing:
            self._trace = []  # a forward that stopped half-way left a partial trace
            return
        if not self.order:
            return
        count = min(self.slot_count, len(self.order))
        if self.keep_slots:
            # copies a forward that stopped half-way issued for units it never ran
            self._drop_pending(keep=tuple(range(count)))
        else:
            self.release()
        if self._slots is None:
            import torch

            self._slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.onload_device)
                           for _ in range(count)]
        for position in range(count):
            if position not in self._pending:  # kept slots: the forward before issued them as it ended
                self._prefetch(position)

    def _prefetch(self, position: int) -> None:
        unit = self.units[self.order[position]]
        slot = self._slots[position % self.slot_count][:unit.layout.nbytes]
        self._pending[position] = self.device.issue_copy(self.stream, slot, unit.region)

    def _enter(self, unit: _Unit) -> None:
        if self._tracing:
            self._trace.append(unit.name)
        position = self._position.get(unit.name)
        if self._slots is not None and position in self._pending:
            self.device.wait_copy(self._pending.pop(position))
            slot = position % self.slot_count
            unit.point_to(self._slots[slot], slot if self.keep_slots else None)
        else:
            if self._slots is not None:
                logger.warning("streamed unit %s ran out of its recorded order: copied blocking", unit.name)
            unit.copy_to_own(self.onload_device, self.device)
        if self.on_ready is not None:
            self.on_ready(unit.name)

    def _leave(self, unit: _Unit) -> None:
        unit.point_home()
        position = self._position.get(unit.name)
        if self._slots is not None and position is not None:
            after = position + self.slot_count  # into the slot this unit has just used
            if after < len(self.order):
                if after not in self._pending:
                    self._prefetch(after)
            elif self.keep_slots:
                # The slot's last unit in this forward: its first unit of the next forward comes now, during this
                # forward's remaining compute, the scheduler's step and the next forward's start.
                first = position % self.slot_count
                if first not in self._pending:
                    self._prefetch(first)

    def _after(self, module, args, output) -> None:
        if not self._tracing:
            if not self.keep_slots:
                self.release()
            elif self._slots is not None:  # the next forward's first units (issued as their slots' last units left)
                self._drop_pending(keep=tuple(range(len(self._slots))))  # copies of units this forward skipped
                for position in range(len(self._slots)):
                    if position not in self._pending:
                        self._prefetch(position)
            return
        if not self._trace:
            return
        self._tracing = False
        trace = self._trace
        if len(set(trace)) != len(trace) or set(trace) != set(self.units):
            twice = sorted({n for n in trace if trace.count(n) > 1})
            missing = sorted(set(self.units) - set(trace))
            logger.warning(
                "streamed units ran %s%s in one forward: their copies stay blocking (correct, not overlapped)",
                f"twice: {twice}" if twice else "", f"not at all: {missing}" if missing else "",
            )
            return
        self.order = list(trace)
        self._position = {name: position for position, name in enumerate(trace)}

    def _drop_pending(self, keep: tuple[int, ...] = ()) -> None:
        """Forget issued copies no unit will use (except those at ``keep``); the compute stream waits for each
        first, so its slot is not written after the memory is handed out again or refilled."""
        for position in [p for p in self._pending if p not in keep]:
            self.device.wait_copy(self._pending.pop(position))

    def release(self) -> None:
        """Drop the slots (and the views into them). A model whose slots are kept (the denoiser, across the steps
        of one image) is released when the VAE starts decoding, when the next image's encoders start, and when a
        managed generation ends."""
        self._drop_pending()
        self._slots = None
        for unit in self.units.values():
            unit.forget_views()

    # -- after an error --------------------------------------------------------------------------------------------

    def offload_all(self) -> int:
        """Point every unit still on the GPU back at its host copy and drop the slots (after an error or an
        interrupt stopped a forward half-way); returns how many units were on the GPU."""
        moved = 0
        for unit in self.units.values():
            if unit.on_device:
                unit.point_home()
                moved += 1
        self.release()
        return moved

    def remove(self) -> None:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

        self.offload_all()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for unit in self.units.values():
            HookRegistry.check_if_exists_or_initialize(unit.module).remove_hook(_GROUP_OFFLOADING, recurse=False)


def _pack_into(units: list[_Unit], allocate) -> int:
    def moved(group: int, index: int, copy) -> None:
        units[group].tensors[index].data = copy

    regions, allocated = pack([list(unit.tensors) for unit in units], allocate, done=moved,
                              filled=give_back_host_memory)
    for unit, region in zip(units, regions):
        unit.region = region
        unit.home = [view_in(region, t, offset) for t, offset in zip(unit.tensors, unit.layout.offsets)]
    return allocated


def _pack_home(units: list[_Unit], host_buffer=None, what: str = "the streamed weights") -> int:
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


def stream_units(model, names, onload_device, device, stream=None, host_buffer=None,
                 keep_slots: bool = False, slots: int = 2) -> UnitStreamer:
    """Stream the units ``names`` of ``model`` (dotted module paths; ``""`` is the model itself) to
    ``onload_device``; the rest of ``model`` is untouched.

    Args:
        model: the denoiser or a text encoder, its streamed units still on the host.
        names: the units.
        onload_device: where they compute (a ``torch.device``).
        device: the mlnb device's copy streams (:meth:`mlnb.device.Device.streams`), whose
            :meth:`~mlnb.device.CopyStreams.issue_copy` and :meth:`~mlnb.device.CopyStreams.wait_copy` order copies
            and compute.
        stream: a copy stream (:meth:`mlnb.device.CopyStreams.copy_stream`); with None, copies are queued on the
            compute stream (on the CPU, where tests run, each is done on return).
        host_buffer: allocates page-locked host memory (:meth:`mlnb.device.CopyStreams.host_buffer`) for the
            units' host regions; without it (or when the host refuses to lock that much) the regions are pageable.
        keep_slots: keep the slots from one forward to the next (the denoiser's steps): no allocation at each step,
            views into the slots made once, and the next forward's first units copied as their slots' last units of
            this one end. The caller releases them (:meth:`UnitStreamer.release`) before anything else needs the
            memory.
        slots: GPU slots, each the size of the largest unit; a unit's copy is issued when the unit this many places
            before it ends, so more slots give each copy more compute to arrive behind, for one more slot's memory.
    """
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    modules = dict(model.named_modules())
    units = [_Unit(name, modules[name]) for name in names]
    allocated = _pack_home(units, host_buffer)
    logger.debug("packed %d streamed units in %d bytes", len(units), allocated)
    streamer = UnitStreamer(model, units, onload_device, device, stream, keep_slots, slots)
    hook_type = _hook_type()
    for unit in units:
        HookRegistry.check_if_exists_or_initialize(unit.module).register_hook(
            hook_type(streamer, unit, onload_device), _GROUP_OFFLOADING
        )
    model._mlnb_streamer = streamer
    return streamer


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
        self.before_onload = None  # called before each copy to the GPU (the denoiser's kept slots are dropped there)
        self.unit = _Unit("", module)
        _pack_home([self.unit], host_buffer, type(module).__name__)

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


def streamer_of(pipe) -> UnitStreamer | None:
    """The streamer of ``pipe``'s denoiser, if a plan streams part of it."""
    for name in ("unet", "transformer"):
        streamer = getattr(getattr(pipe, name, None), "_mlnb_streamer", None)
        if streamer is not None:
            return streamer
    return None


def module_streamer(module) -> UnitStreamer | None:
    """The streamer that streams ``module``'s units, or None."""
    return getattr(module, "_mlnb_streamer", None)


def streamers_of(pipe) -> list[UnitStreamer]:
    """Every streamer of ``pipe``'s components (denoiser and text encoders)."""
    found = (getattr(module, "_mlnb_streamer", None) for module in pipe.components.values())
    return [streamer for streamer in found if streamer is not None]
