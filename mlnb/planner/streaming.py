"""Streaming a plan's units (denoiser blocks, text encoder parts) from pinned host memory through a GPU ring.

Each streamed unit's weights live on the host in one contiguous page-locked region (:mod:`.packed`, :mod:`.pinning`).
On the GPU the units of a model share one buffer, the ring, of ``slots ×`` the largest unit's bytes (the planner's
memory model), allocated once when a phase starts: a text encoder's forward, or the denoiser's steps of one image
(``keep_slots``), whose ring is kept from one step to the next and released when the VAE starts decoding, the next
image's encoders start, or a managed generation ends. Nothing is allocated or freed in between, so the streaming
gives the allocator no reason to free cached memory under a cap (which synchronises the device) during a step.

The first forward records the order in which the units run, copying each blocking into memory of its own. From the
next forward on:

- every unit has a fixed place in the ring (:func:`.ring.ring_layout`: one after the other in running order; one
  that would pass the ring's end starts again at byte 0, or with ``split`` is split between two of its tensors, the
  rest at byte 0), and its parameters point at
  their views of the ring for the whole phase: bound once as the phase starts, pointed home as it ends
  (:meth:`UnitStreamer.release`), after an error (:meth:`UnitStreamer.offload_all`) and before anything else reads
  the weights (a LoRA change removes the streamer, :meth:`UnitStreamer.remove`);
- units that run one right after the other form groups (:mod:`.ring`: a text encoder's layers, a run of streamed
  blocks, at most a quarter of the ring together); a unit that runs alone is a group of one. The first forward
  tells which units are adjacent: it counts the calls of the model's modules that have weights of their own outside
  the units, between one unit's end and the next one's start;
- each copy goes on the one copy stream, in running order, as soon as its bytes in the ring are free: once the group
  of the latest unit whose bytes it overwrites has computed (a reused event the compute stream records after the
  group's last unit, which the copy stream waits for). Prefetch therefore runs as far ahead as the ring allows, from
  the end of one forward into the next with a kept ring; a unit larger than the ring's free space waits for the
  space. A split unit is two copies, the event recorded after the second;
- a group's first unit, as it starts, makes the compute stream wait for the group's copies: for the last one issued,
  which the copy stream runs after the others (a reused event: the host does not wait). Its other units only check
  that they run in the recorded order. A unit whose bytes no other unit shares stays in the ring after its first copy
  and is not copied again.

The host never waits for the GPU and makes no event per step; a group of ``k`` units costs it one wait and one mark
instead of ``k`` of each. The planner's :func:`~mlnb.planner.cost.schedule_step`
replays the same rule.

The hooks are diffusers' (a ``ModelHook`` in the unit's ``HookRegistry``, under group offloading's name, so the
pipeline finds the onload device and refuses a second offloading as it does for its own), but not diffusers' group
offloading itself: its hook waits on the host for the compute stream at every offload (without ``record_stream``)
and for the copy stream at every onload, allocates every tensor of a unit on the copy stream's pool and frees it
into that pool, and issues one copy per tensor, so its copies do not overlap the compute (``docs/benchmarks.md``).

A unit that runs twice in one forward, or not at all, leaves the order unrecorded. Every unit then copies blocking
into memory of its own when it runs, which is correct and slower; a warning says so. A unit that runs outside the
recorded order in a later forward (a unit skipped, even inside a group, puts every later one out of it) copies
blocking too, with a warning, and the next forward starts the ring's copies afresh.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

from .packed import MappedUnit, PackedUnit, WholeModel, is_mapped, pack_home, pin_whole
from .ring import GROUP_SHARE, RingLayout, ring_layout

logger = logging.getLogger(__name__)

__all__ = ["UnitStreamer", "WholeModel", "pin_whole", "stream_units", "streamer_of", "streamers_of", "module_streamer"]


def _hook_type():
    from diffusers.hooks import ModelHook

    class StreamHook(ModelHook):
        """Has a unit's copy waited for before its forward, and its compute marked after."""

        _is_stateful = False

        def __init__(self, streamer: "UnitStreamer", unit: PackedUnit, onload_device) -> None:
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


def _recasts(module) -> bool:
    """Whether a layer of ``module`` is under diffusers' layerwise casting (fp8 storage)."""
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

    for layer in module.modules():
        registry = getattr(layer, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(_LAYERWISE_CASTING_HOOK) is not None:
            return True
    return False


class UnitStreamer:
    """The streamed units of one model (a denoiser or a text encoder), their ring and the order of the units."""

    def __init__(self, model, units: list[PackedUnit], onload_device, device, stream, keep_slots: bool = False,
                 slots: int = 2, group_share: float = GROUP_SHARE, split: bool = False) -> None:
        if slots < 2:
            raise ValueError(f"streaming needs at least two slots (one computing, one arriving), got {slots}")
        self.units = {unit.name: unit for unit in units}
        self.onload_device, self.device, self.stream = onload_device, device, stream
        self.keep_slots = keep_slots
        self.slot_count = slots
        self.group_share = group_share
        self.split = split
        self.slot_bytes = max(unit.layout.nbytes for unit in units)
        self.ring_bytes = self.slot_bytes * min(slots, len(units))
        self.order: list[str] | None = None  # execution order, once recorded
        self.layout: RingLayout | None = None  # each unit's place in the ring and its group, by position in the order
        self._position: dict[str, int] = {}
        self._trace: list[str] = []
        self._edges: list[tuple[int, int]] = []  # per traced unit: the count of other calls as it starts and ends
        self._calls = 0  # calls of the model's modules with weights of their own outside the units, while tracing
        self._tracing = True
        self._warned = False
        self._ring = None  # the device buffer, while a phase lasts
        self._targets: list = []  # per position: ((ring stretch, host region piece), ...), and its tensors' views
        self._regions: list = []  # per position: its host region
        self._arrived: list = []  # per position: the event its copy records (made once)
        self._computed: list = []  # per position: its group's event, recorded after the group's last unit (made once)
        self._first: list = []  # per position: its group's positions, last first, if it starts the group, else None
        self._last: list = []  # per position: the first position of its group if it ends one, else None
        # units with a layer under diffusers' layerwise casting, which re-points its weights at each forward
        self._recast = frozenset(unit.name for unit in units if _recasts(unit.module))
        self._pending: set[int] = set()  # positions whose copies are issued and not yet waited for
        self._done = 0  # uses computed since the ring was filled afresh (use j is position j mod the unit count)
        self._next = 0  # the next use whose copy is considered
        self._cursor = 0  # the position expected to start next in this forward
        # Called with a unit's name once the compute stream may run it: for the first unit of a group, once the
        # group's copies are waited for (the block timer marks there, to tell a streamed block's wait from its
        # compute); a group's other units have nothing left to wait for, and are not called.
        self.on_ready = None
        self._handles = [model.register_forward_pre_hook(self._before), model.register_forward_hook(self._after)]
        self._counting = self._count_calls(model, units)

    def _count_calls(self, model, units: list[PackedUnit]) -> list:
        """Count, while the first forward runs, the calls of the model's modules that hold weights of their own
        outside the units (a resident block, a norm between two units): two units with none between are adjacent."""
        inside = {id(module) for unit in units for module in unit.module.modules()}

        def count(module, args) -> None:
            self._calls += 1

        return [module.register_forward_pre_hook(count) for module in model.modules()
                if id(module) not in inside and (next(module.parameters(recurse=False), None) is not None
                                                 or next(module.buffers(recurse=False), None) is not None)]

    def _stop_counting(self) -> None:
        for handle in self._counting:
            handle.remove()
        self._counting = []

    @property
    def chained(self) -> bool:
        """Whether units are prefetched into the ring (the order is recorded)."""
        return self.order is not None

    def host_copies(self) -> list:
        """Every host copy of every unit (views into the pinned regions)."""
        return [home for unit in self.units.values() for home in unit.home]

    # -- what it holds now (read-only) -----------------------------------------------------------------------------

    @property
    def ring(self):
        """The ring's device memory (uint8, :attr:`ring_bytes`) while a phase lasts, else None."""
        return self._ring

    @property
    def slots_in_use(self) -> int:
        """How many of the largest unit the ring allocated now holds: during a phase (a forward, or an image's steps
        with a kept ring); 0 once released."""
        return self.ring_bytes // self.slot_bytes if self._ring is not None else 0

    @property
    def pending_copies(self) -> frozenset[int]:
        """Positions (in the recorded order) of the units whose copies are issued and not yet waited for: with a kept
        ring, between forwards, the next forward's first units that the ring had room for."""
        return frozenset(self._pending)

    def units_on_device(self) -> tuple[str, ...]:
        """The units whose weights point at device memory now (the ring during a phase, or a copy of their own)."""
        return tuple(name for name, unit in self.units.items() if unit.on_device)

    # -- one phase -------------------------------------------------------------------------------------------------

    def _before(self, module, args) -> None:
        if self._tracing:
            self._trace, self._edges = [], []  # a forward that stopped half-way left a partial trace
            return
        if not self.order:
            return
        if self._ring is None:
            self._begin_phase()
        elif self._done % len(self.order):  # a group's end passed in a forward that stopped half-way or skipped a unit
            self._drop_pending()
            self._done = self._next = 0
            for unit in self.units.values():
                if unit.where == "own":
                    self._bind(unit)
            self._issue()
        self._cursor = 0

    def _begin_phase(self) -> None:
        """Allocate the ring, point every unit at its views of it (once for the phase) and issue the first copies."""
        self._ring = self.device.device_buffer(self.ring_bytes, self.onload_device)
        self._targets = []
        for position, name in enumerate(self.order):
            unit, region = self.units[name], self._regions[position]
            pieces, at = [], 0
            for start, size in self.layout.pieces(position):
                pieces.append((self._ring[start:start + size], region[at:at + size] if region is not None else None))
                at += size
            cut = self.layout.cuts[position]
            views = unit.views_into(pieces[0][0], pieces[-1][0] if cut is not None else None, cut)
            self._targets.append((tuple(pieces), views))
        for unit in self.units.values():
            self._bind(unit)
        self._done = self._next = self._cursor = 0
        self._issue()

    def _bind(self, unit: PackedUnit) -> None:
        unit.point(self._targets[self._position[unit.name]][1], "ring")

    def _issue(self) -> None:
        """Issue, in running order, every copy whose bytes in the ring are free (their blocker's group has computed):
        the rule of :meth:`.ring.RingLayout.computed_before`, inlined (it runs after every group)."""
        waits, count, done = self.layout.waits, len(self.order), self._done
        # a ring released as the forward ends (an encoder's) takes no copies for a next forward
        limit = done + count if self.keep_slots else count
        use = self._next
        while use < limit:
            position = use % count
            distance = waits[position]
            if distance is None:
                if use >= count:  # still in the ring since its first copy
                    use += 1
                    continue
                needed = 0
            else:
                needed = max(0, use - distance + 1)
                if needed > done:
                    break
            after = self._computed[(needed - 1) % count] if needed else None
            if self._regions[position] is None:  # left in the files' mapping: read from there, tensor by tensor
                self.units[self.order[position]].fill(self.device, self.stream, self._targets[position][1],
                                                      after=after, done=self._arrived[position])
            else:
                for dst, src in self._targets[position][0]:
                    self.device.issue_copy(self.stream, dst, src, after=after, done=self._arrived[position])
            self._pending.add(position)
            use += 1
        self._next = use

    def _enter(self, unit: PackedUnit) -> None:
        if self._tracing:
            self._trace.append(unit.name)
            self._edges.append((self._calls, self._calls))
        position = self._position.get(unit.name)
        if self._ring is not None and position == self._cursor and unit.where == "ring":
            self._cursor = position + 1
            members = self._first[position]
            if members is None:  # inside a group: its copy was waited for as the group started
                return
            pending = self._pending
            for member in members:  # one copy stream: the group's last copy issued lands after the others
                if member in pending:
                    self.device.wait_copy(self._arrived[member])
                    for other in members:
                        pending.discard(other)
                    break
        else:
            if self._ring is not None and not self._warned:
                self._warned = True
                logger.warning("streamed unit %s ran out of its recorded order: copied blocking", unit.name)
            unit.copy_to_own(self.onload_device, self.device)
        if self.on_ready is not None:
            self.on_ready(unit.name)

    def _leave(self, unit: PackedUnit) -> None:
        if self._tracing:
            self._edges[-1] = (self._edges[-1][0], self._calls)
        if unit.where == "own":  # a blocking copy for one run: the ring's view again, or home
            if self._ring is not None:
                self._bind(unit)
            else:
                unit.point_home()
            return
        if unit.name in self._recast:
            # Layerwise casting (fp8 storage) sent the unit's layers back to their storage dtype with ``module.to``,
            # which gives the weights new memory: point them at the ring again, which frees that copy at once.
            self._bind(unit)
        position = self._position[unit.name]
        first = self._last[position]
        if first is None:  # the group goes on
            return
        self.device.mark_done(self._computed[position])
        self._done += position - first + 1
        self._issue()

    def _after(self, module, args, output) -> None:
        if not self._tracing:
            if not self.keep_slots:
                self.release()
            return
        if not self._trace:
            return
        self._tracing = False
        self._stop_counting()
        trace, edges = self._trace, self._edges
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
        units = [self.units[name] for name in trace]
        # a unit is adjacent to the next when no call of the model's other weighted modules came between them
        adjacent = [edges[p][1] == edges[p + 1][0] for p in range(len(trace) - 1)] + [False]
        self.layout = ring_layout([unit.layout.nbytes for unit in units], self.ring_bytes,
                                  cuts=[unit.layout.offsets[1:] for unit in units] if self.split else None,
                                  adjacent=adjacent,
                                  group_share=self.group_share)
        self._regions = [unit.region for unit in units]
        self._arrived = [self.device.new_event() for _ in trace]
        self._first, self._last, self._computed = [None] * len(trace), [None] * len(trace), [None] * len(trace)
        for first, last in self.layout.groups:
            self._first[first], self._last[last] = tuple(range(last, first - 1, -1)), first
            event = self.device.new_event()
            for position in range(first, last + 1):
                self._computed[position] = event

    def _drop_pending(self) -> None:
        """Forget issued copies no unit will use; the compute stream waits for each first, so that the ring is not
        written after its memory is handed out again or refilled."""
        for position in sorted(self._pending):
            self.device.wait_copy(self._arrived[position])
        self._pending.clear()

    def release(self) -> None:
        """Point every unit home and drop the ring. A model whose ring is kept (the denoiser, across the steps of one
        image) is released when the VAE starts decoding, when the next image's encoders start, and when a managed
        generation ends."""
        self._drop_pending()
        for unit in self.units.values():
            if unit.on_device:
                unit.point_home()
        self._ring = None
        self._targets = []
        self._done = self._next = self._cursor = 0

    # -- after an error --------------------------------------------------------------------------------------------

    def offload_all(self) -> int:
        """Point every unit still on the GPU back at its host copy and drop the ring (after an error or an interrupt
        stopped a forward half-way); returns how many units pointed at device memory."""
        moved = len(self.units_on_device())
        self.release()
        return moved

    def remove(self) -> None:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

        self.offload_all()
        self._stop_counting()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for unit in self.units.values():
            HookRegistry.check_if_exists_or_initialize(unit.module).remove_hook(_GROUP_OFFLOADING, recurse=False)


def stream_units(model, names, onload_device, device, stream=None, host_buffer=None,
                 keep_slots: bool = False, slots: int = 2, mapped=(), group_share: float = GROUP_SHARE,
                 split: bool = False) -> UnitStreamer:
    """Stream the units ``names`` of ``model`` (dotted module paths; ``""`` is the model itself) to
    ``onload_device``; the rest of ``model`` is untouched.

    Args:
        model: the denoiser or a text encoder, its streamed units still on the host.
        names: the units.
        onload_device: where they compute (a ``torch.device``).
        device: the mlnb device's copy streams (:meth:`mlnb.device.Device.streams`), which allocate the ring, make
            the events and order copies and compute.
        stream: a copy stream (:meth:`mlnb.device.CopyStreams.copy_stream`); with None, copies are queued on the
            compute stream (on the CPU, where tests run, each is done on return).
        host_buffer: allocates page-locked host memory (:meth:`mlnb.device.CopyStreams.host_buffer`) for the
            units' host regions; without it (or when the host refuses to lock that much) the regions are pageable.
        keep_slots: keep the ring, and the parameters bound to it, from one forward to the next (the denoiser's
            steps): no allocation at each step, and the next forward's first copies issued as soon as the ring has
            room, during this one. The caller releases it (:meth:`UnitStreamer.release`) before anything else needs
            the memory.
        slots: the ring holds this many of the largest unit; a larger ring lets copies run further ahead, for
            more memory.
        mapped: units left in the weight files' mapping (:class:`.packed.MappedUnit`): no pinned copy, each copy
            read from the mapping; a unit streamed from the mapping before (a LoRA change streams them again) stays
            so.
        group_share: adjacent units are entered and left as one group of at most this share of the ring's bytes
            (:data:`.ring.GROUP_SHARE`; 0 makes every unit a group of its own).
        split: a unit that passes the ring's end is split between two of its tensors instead of starting again at
            byte 0 (the plan's ``split_units``: where the planner's replay finds it faster).
    """
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    modules = dict(model.named_modules())
    mapped = set(mapped) | {name for name in names if is_mapped(modules[name])}
    units = [MappedUnit(name, modules[name]) if name in mapped else PackedUnit(name, modules[name]) for name in names]
    pinned = [unit for unit in units if not isinstance(unit, MappedUnit)]
    allocated = pack_home(pinned, host_buffer) if pinned else 0
    logger.debug("packed %d streamed units in %d bytes", len(units), allocated)
    streamer = UnitStreamer(model, units, onload_device, device, stream, keep_slots, slots, group_share, split)
    hook_type = _hook_type()
    for unit in units:
        HookRegistry.check_if_exists_or_initialize(unit.module).register_hook(
            hook_type(streamer, unit, onload_device), _GROUP_OFFLOADING
        )
    model._mlnb_streamer = streamer
    return streamer


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
