"""Room for the decode: the kept denoiser blocks that the VAE decode's peak cannot hold beside them go to their pinned
host copy before the decode, and come back for the next image.

A plan keeps part of the denoiser on the GPU for the steps. The decode needs the VAE and its activations, which for
SDXL at 1024² untiled are gigabytes; counted on top of the whole kept part, a small budget leaves room only for
small tiles (many small kernels, each seam blended) or a smaller kept part (more streamed every step). With
:attr:`~mlnb.planner.cost.Plan.decode_offload`, the planner names the kept blocks to move out of the way instead.

Each of those blocks lives in one contiguous region of page-locked host memory as well (:mod:`.pinning`), and on the
GPU in memory of its own while it is there. Before the decode (a forward-pre-hook on the VAE's ``post_quant_conv``
and ``decoder``, which only a decode runs) its tensors point at their host copy again and the GPU memory goes back to
the allocator for the decode: nothing is copied back, the weights have not changed. When the next image's first
model starts (a text encoder, or the denoiser when the prompt is given as embeddings) each block's copy to new GPU
memory is issued on a copy stream, so it arrives while the encoders run; the compute stream waits for a block's copy
(an event: the host does not wait) only as the block starts.

A LoRA applied or removed while the blocks are on the host adds or drops tensors: a block whose tensors changed is
packed again, with its adapters, the next time it moves.
"""

from __future__ import annotations

import logging

from ..optimizer.context import denoiser_of
from .packed import module_tensors, pack_into, pageable
from .pinning import layout, view_in

logger = logging.getLogger(__name__)

__all__ = ["DecodeRoom", "make_decode_room", "decode_room_of"]


class _Held:
    """One kept block: its tensors, their host copies (views into one pinned region) and, while it is on the GPU,
    its device memory and the copy that fills it."""

    def __init__(self, name: str, module) -> None:
        self.name, self.module = name, module
        self.tensors: list = []
        self.layout = None  # where each tensor sits in the region
        self.region = None  # uint8, on the host
        self.home: list = []
        self.memory = None  # uint8, on the device, while the block is there
        self.pending = None  # the copy into it, until the compute stream has waited for it

    @property
    def changed(self) -> bool:
        """Whether the module's tensors are no longer those packed (a LoRA's adapters were added or removed)."""
        return [id(t) for t in module_tensors(self.module)] != [id(t) for t in self.tensors]


def _pack(held: list[_Held], host_buffer) -> None:
    """Pack each block's current tensors into packed host buffers from ``host_buffer`` and point them there
    (releasing each original as it is copied)."""
    for unit in held:
        unit.tensors = module_tensors(unit.module)
        unit.layout = layout(unit.tensors)

    def allocate(nbytes: int):
        try:
            return host_buffer(nbytes)
        except RuntimeError as exc:  # the host cannot lock that much: pageable, correct and slower
            logger.warning("could not pin %d bytes for the decode's kept blocks (%s); they stay pageable", nbytes, exc)
            return pageable(nbytes)

    pack_into(held, allocate)
    for unit in held:
        unit.memory = unit.pending = None


class DecodeRoom:
    """The kept blocks a plan sends to the host for each decode.

    Args:
        model: the denoiser.
        names: the blocks (dotted module paths), on the host when this is made.
        onload_device: where they compute (a ``torch.device``).
        device: the mlnb device's copy streams (:meth:`mlnb.device.Device.streams`).
        stream: a copy stream for their copies back, or None to copy in order on the compute stream.
        host_buffer: allocates page-locked host memory (:meth:`mlnb.device.CopyStreams.host_buffer`).
    """

    def __init__(self, model, names, onload_device, device, stream=None, host_buffer=None) -> None:
        modules = dict(model.named_modules())
        self.held = [_Held(name, modules[name]) for name in names]
        self.onload_device, self.device, self.stream = onload_device, device, stream
        self.host_buffer = host_buffer or pageable
        _pack(self.held, self.host_buffer)
        self.on_device = False  # the blocks are on the GPU (from one image's start to its decode)
        self._handles: list = []

    @property
    def nbytes(self) -> int:
        return sum(unit.layout.nbytes for unit in self.held)

    def units_on_device(self) -> tuple[str, ...]:
        """The blocks whose weights are on the GPU now."""
        return tuple(unit.name for unit in self.held if unit.memory is not None)

    def send_home(self, *_) -> None:
        """Point every block back at its host copy and let its GPU memory go (before the decode; once, however many
        tiles it decodes). A tensor added since the block was packed (a LoRA's) stays where it is until then."""
        if not self.on_device:
            return
        for unit in self.held:
            if unit.memory is None:
                continue
            self._wait(unit)  # the memory is handed out again: the copy into it must be done first
            for tensor, home in zip(unit.tensors, unit.home):
                tensor.data = home
            unit.memory = None
        self.on_device = False

    def bring_back(self, *_) -> None:
        """Copy every block at home to new GPU memory, on the copy stream (for the next image; once, however many
        forwards start before the decode). A block whose tensors changed is packed again first."""
        import torch

        if self.on_device:
            return
        for unit in self.held:
            if unit.changed:
                self._wait(unit)
                _pack([unit], self.host_buffer)  # from wherever its tensors are now, onto the host
            if unit.memory is not None:
                continue
            memory = torch.empty(unit.layout.nbytes, dtype=torch.uint8, device=self.onload_device)
            unit.pending = self.device.issue_copy(self.stream, memory, unit.region)
            for tensor, offset in zip(unit.tensors, unit.layout.offsets):
                tensor.data = view_in(memory, tensor, offset)
            unit.memory = memory
        self.on_device = True

    def _wait(self, unit: _Held) -> None:
        if unit.pending is not None:
            self.device.wait_copy(unit.pending)
            unit.pending = None

    def hook(self, vae, models) -> None:
        """Send the blocks home as ``vae`` decodes, bring them back as the first of ``models`` (the text encoders and
        the denoiser) starts, and make each block's compute wait for its copy as it starts."""
        import torch

        parts = [getattr(vae, name, None) for name in ("post_quant_conv", "decoder")] if vae is not None else []
        for module in parts:
            if isinstance(module, torch.nn.Module):
                self._handles.append(module.register_forward_pre_hook(self.send_home))
        for model in models:
            self._handles.append(model.register_forward_pre_hook(self.bring_back))
        for unit in self.held:
            self._handles.append(unit.module.register_forward_pre_hook(lambda m, a, _u=unit: self._wait(_u)))


def make_decode_room(model, names, onload_device, device, stream=None, host_buffer=None,
                     vae=None, models=()) -> DecodeRoom:
    """Pin the blocks ``names`` of ``model`` (still on the host), put them on the GPU, and hook them to leave for
    ``vae``'s decodes and come back when one of ``models`` starts; returns the :class:`DecodeRoom`."""
    room = DecodeRoom(model, names, onload_device, device, stream, host_buffer)
    room.bring_back()
    room.hook(vae, models)
    model._mlnb_decode_room = room
    logger.debug("%d kept blocks (%d bytes) leave the GPU for each decode", len(room.held), room.nbytes)
    return room


def decode_room_of(pipe) -> DecodeRoom | None:
    """The :class:`DecodeRoom` of ``pipe``'s denoiser, if its plan sends kept blocks to the host for the decode."""
    return getattr(denoiser_of(pipe), "_mlnb_decode_room", None)
