"""A budget plan: where each part of a pipeline's weights lives for one GPU budget (and the host RAM it may pin), and
what that is predicted to cost (:mod:`mlnb.planner.cost`, :mod:`mlnb.planner.search`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..units import format_bytes
from .host_ram import host_summary

__all__ = ["Plan"]


@dataclass(frozen=True)
class Plan:
    """Where each part of the pipeline lives for one budget, and what that is predicted to cost."""

    budget: int
    strategy: str  # "resident", "offload encoders and VAE", "stream"
    resident: tuple[str, ...]
    streamed: tuple[str, ...]
    offload_encoders_vae: bool
    fp8: bool
    vae_tile: int | None
    predicted_peak: int
    predicted_seconds: float | None
    streamed_bytes: int
    transfer_once_bytes: int = 0  # encoder and VAE bytes moved to the GPU once per image
    notes: tuple[str, ...] = field(default=())
    slots: int = 2  # the streamed blocks' GPU ring holds this many of the largest one
    # a streamed block that passes the ring's end is split between two of its tensors (else it starts again at byte
    # 0): where the schedule replay finds that faster (:mod:`.ring`)
    split_units: bool = False
    # kept blocks sent to their pinned host copy before the decode (its peak cannot hold them), copied back for the
    # next image, and their bytes
    decode_offload: tuple[str, ...] = ()
    decode_offload_bytes: int = 0
    # host RAM (:mod:`.host_ram`): the pinned bytes and the RAM allowed them; the offloaded components (text encoders,
    # "vae") pinned; what is copied from the weight files' mapping instead: streamed units, components by name
    pinned_bytes: int = 0
    host_budget: int | None = None
    pinned_models: tuple[str, ...] = ()
    mapped_units: tuple[str, ...] = ()
    mapped_models: tuple[str, ...] = ()
    mapped_bytes: int = 0

    def summary(self) -> str:
        parts = [self.strategy]
        if self.streamed:
            through = f" through {self.slots} slots" if self.slots != 2 else ""
            parts.append(f"{len(self.streamed)} blocks streamed ({format_bytes(self.streamed_bytes)}){through}, "
                         f"{len(self.resident)} resident")
        if self.fp8:
            parts.append("fp8 storage")
        if self.vae_tile:
            parts.append(f"VAE tiles {self.vae_tile}")
        if self.decode_offload:
            parts.append(f"{len(self.decode_offload)} kept blocks ({format_bytes(self.decode_offload_bytes)}) to the "
                         f"host for the {'tiled' if self.vae_tile else 'untiled'} decode")
        host = host_summary(self)
        if host:
            parts.append(host)
        return ", ".join(parts)

    def prediction(self) -> str:
        known = self.predicted_seconds is not None
        time = f"{self.predicted_seconds:.1f} s" if known else "time unknown until measured"
        return f"predicted peak {format_bytes(self.predicted_peak)} of {format_bytes(self.budget)}, {time}"

    def __str__(self) -> str:
        return f"plan for {format_bytes(self.budget)}: {self.summary()}; {self.prediction()}"
