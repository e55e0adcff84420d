"""Streaming a plan's denoiser units from pinned host memory, each prefetched on a copy stream.

Each streamed unit (a denoiser block, or a part of one, named by the plan) becomes one diffusers ``ModuleGroup``
under a ``GroupOffloadingHook``: diffusers' own pinning, copy, stream and offload code. ``apply_group_offloading``
itself does not fit a plan for two reasons:

- At block level it makes groups only of ``ModuleList`` items. Whatever else a module holds goes into one group
  without a stream, copied from pageable memory and copied back to the host after every call. A transformer block
  streamed on its own would be all that.
- Its prefetch chain links groups inside one call. A plan streams blocks with resident blocks between them, and
  needs the chain to run across them.

So the groups are made here, one per unit. The chain is built after the first forward, from the order in which the
units really ran. That first forward copies each unit blocking. From then on each unit, as it starts, waits for its
own copy and starts the next streamed unit's copy on the copy stream (diffusers' prefetch), and the denoiser's
forward starts the first. A copy can therefore run during everything computed between two streamed units. At most
two streamed units are on the GPU at once: the one computing and the one arriving. Offloads wait for the compute
stream (diffusers' default, without ``record_stream``), so the host never runs ahead and keeps a third unit alive.

Measured on an H100 (docs/benchmarks.md, runs 3 and 4): the copies did not overlap the compute. A streamed SDXL step
took compute plus copies (114 ms = 67 ms + 52 ms for 2.5 GiB in 59 units). Each unit's start waits for the compute
before it (the offload's synchronisation) and then issues its tensor copies one by one while the GPU has nothing
queued. Issuing the next copy after a unit's kernels instead (a hook subclass, run 4) was slower (173 ms for 1.7 GiB
in 46 units): the copy then had only the compute between two streamed units to hide behind. The planner's time
model takes the overlap it measured (0 so far).

A unit that runs twice in one forward, or not at all, leaves the chain unbuilt. Every unit then copies blocking,
which is correct and slower; a warning says so.
"""

from __future__ import annotations

import itertools
import logging

logger = logging.getLogger(__name__)

__all__ = ["UnitStreamer", "stream_units", "streamer_of", "streamers_of"]

def _on_host(group) -> bool:
    for module in group.modules:
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            return tensor.device.type == "cpu"
    return False


class UnitStreamer:
    """The streamed units of one model (a denoiser or a text encoder): their hooks and the prefetch chain."""

    def __init__(self, denoiser, hooks: dict, stream) -> None:
        self.hooks = hooks  # unit name -> GroupOffloadingHook, in plan order
        self.stream = stream
        self.order: list[str] | None = None  # execution order once the chain is built
        self._trace: list[str] = []
        self._tracing = True
        self._handles = [denoiser.register_forward_pre_hook(self._before), denoiser.register_forward_hook(self._after)]
        for name, hook in hooks.items():
            self._handles.append(hook.group.onload_leader.register_forward_pre_hook(self._tracer(name)))

    @property
    def chained(self) -> bool:
        return self.order is not None

    def _tracer(self, name: str):
        def record(module, args):
            if self._tracing:
                self._trace.append(name)
        return record

    def _before(self, module, args) -> None:
        if self._tracing:
            self._trace = []  # a forward that stopped half-way left a partial trace
        elif self.order:
            first = self.hooks[self.order[0]].group
            if _on_host(first):
                first.onload_()  # asynchronous: issued before the embeddings and the resident blocks before it

    def _after(self, module, args, output) -> None:
        if not self._tracing or not self._trace:
            return
        self._tracing = False
        trace = self._trace
        if len(set(trace)) != len(trace) or set(trace) != set(self.hooks):
            twice = sorted({n for n in trace if trace.count(n) > 1})
            missing = sorted(set(self.hooks) - set(trace))
            logger.warning(
                "streamed units ran %s%s in one forward: their copies stay blocking (correct, not overlapped)",
                f"twice: {twice}" if twice else "", f"not at all: {missing}" if missing else "",
            )
            return
        hooks = [self.hooks[name] for name in trace]
        for current, following in zip(hooks, hooks[1:]):
            current.next_group = following.group
        for hook in hooks:
            hook.group.onload_self = False  # the previous unit (or, for the first, the denoiser's forward) copies it
            hook.group.non_blocking = True
        self.order = list(trace)

    def offload_all(self) -> int:
        """Send every streamed unit still on the GPU back to pinned memory (after an error or an interrupt leaves
        one there); returns how many were."""
        moved = 0
        if self.stream is not None:
            self.stream.synchronize()
        for hook in self.hooks.values():
            if not _on_host(hook.group):
                hook.group.offload_()
                moved += 1
        return moved

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _pin_packed(hooks: dict, host_buffer) -> None:
    """Replace the host copies of every streamed unit by views into packed page-locked buffers (:mod:`.pinning`),
    releasing each pageable original as soon as it is copied."""
    from .pinning import pack

    groups = [hook.group for hook in hooks.values()]
    owners: dict = {}  # tensor -> the groups holding its host copy (a tied weight is packed once)
    for group in groups:
        for tensor in group.cpu_param_dict:
            owners.setdefault(tensor, []).append(group)
    tensors = list(owners)
    sources = [owners[t][0].cpu_param_dict[t] for t in tensors]

    def moved(index: int, copy) -> None:
        tensor = tensors[index]
        for group in owners[tensor]:
            group.cpu_param_dict[tensor] = copy
        if tensor.device.type == "cpu":
            tensor.data = copy

    try:
        _, allocated = pack(sources, host_buffer, done=moved)
    except RuntimeError as exc:  # the host cannot lock that much: what is left is pinned on the fly at each onload
        logger.warning("could not pin all the streamed weights (%s); the rest are pinned on the fly as they copy", exc)
        return
    logger.debug("pinned %d streamed tensors in %d bytes", len(tensors), allocated)


def stream_units(denoiser, names, onload_device, stream, host_buffer=None) -> UnitStreamer:
    """Stream the units ``names`` of ``denoiser`` (dotted module paths) to ``onload_device``; the rest is untouched.

    Args:
        denoiser: the UNet or transformer, its streamed units still on the host.
        names: the units in execution order.
        onload_device: where they compute (a ``torch.device``).
        stream: a copy stream (:meth:`mlnb.device.Device.copy_stream`); with None, copies are blocking from pageable
            memory and nothing is pinned (the CPU path the tests take; the chain is built all the same, and each
            prefetch there is a blocking no-op).
        host_buffer: allocates page-locked host memory (:meth:`mlnb.device.Device.host_buffer`) for the packed host
            copies; without it diffusers pins each tensor by itself (rounded up to a power of two).
    """
    import torch
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        GroupOffloadingConfig,
        GroupOffloadingHook,
        GroupOffloadingType,
        ModuleGroup,
    )

    offload_device = torch.device("cpu")
    packed = stream is not None and host_buffer is not None  # diffusers keeps the pageable originals; packed below
    config = GroupOffloadingConfig(
        onload_device=onload_device, offload_device=offload_device, offload_type=GroupOffloadingType.BLOCK_LEVEL,
        non_blocking=False, record_stream=False, low_cpu_mem_usage=packed, num_blocks_per_group=1, stream=stream,
    )
    modules = dict(denoiser.named_modules())
    hooks = {}
    for name in names:
        unit = modules[name]
        group = ModuleGroup(
            modules=[unit], offload_device=offload_device, onload_device=onload_device,
            offload_leader=unit, onload_leader=unit, non_blocking=False, stream=stream, record_stream=False,
            low_cpu_mem_usage=packed, onload_self=True, group_id=name,
        )
        group.non_blocking = False  # a stream turns it on; the first forward copies blocking until the chain exists
        hook = GroupOffloadingHook(group, config=config)
        HookRegistry.check_if_exists_or_initialize(unit).register_hook(hook, _GROUP_OFFLOADING)  # offloads the unit
        hooks[name] = hook
    if packed:
        _pin_packed(hooks, host_buffer)
    streamer = UnitStreamer(denoiser, hooks, stream)
    denoiser._mlnb_streamer = streamer
    return streamer


def streamer_of(pipe) -> UnitStreamer | None:
    """The streamer of ``pipe``'s denoiser, if a plan streams part of it."""
    for name in ("unet", "transformer"):
        streamer = getattr(getattr(pipe, name, None), "_mlnb_streamer", None)
        if streamer is not None:
            return streamer
    return None


def streamers_of(pipe) -> list[UnitStreamer]:
    """Every streamer of ``pipe``'s components (denoiser and text encoders)."""
    found = (getattr(module, "_mlnb_streamer", None) for module in pipe.components.values())
    return [streamer for streamer in found if streamer is not None]
