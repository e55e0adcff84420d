"""The host RAM side of the budget planner's cost model (pure; no torch): what a placement pins on the host, and
what copying from the weight files' mapping (pageable memory) instead costs.

A plan pins the host copies it copies from, packed as :mod:`.pinning` packs them (one packing per model, into
power-of-two buffers): its streamed units, the kept blocks it sends to the host for the decode, and, with the encoders
and the VAE offloaded, each text encoder's units and the VAE (:func:`pinned_bytes`). The kept part leaves none. The
parts a plan leaves in the files' mapping (``Plan.mapped_units``, ``Plan.mapped_models``) pin nothing; their copies
run at the pageable bandwidth (:func:`pageable_bandwidth`), none of it hidden: a mapped unit adds its copy to every
step (:func:`mlnb.planner.cost.mapped_step`), a mapped component the difference to a pinned copy once per image
(:func:`mapped_once_seconds`).
"""

from __future__ import annotations

import functools

from ..units import format_bytes
from .pinning import packed_bytes

__all__ = ["PAGEABLE_FRACTION", "pageable_bandwidth", "with_mapped", "mapped_once_seconds", "mapped_once_bytes",
           "pinned_bytes", "host_summary"]

# An assumption, not a measurement: a copy from pageable memory (a weight left in its file's mapping) runs at this
# fraction of the pinned bandwidth until the card has measured it (``CardFacts.pageable_bandwidth``). The driver
# copies pageable memory through a staging buffer of its own, and pages not yet resident fault in on the way; a
# quarter is on the slow side of what such copies reach from the page cache (pages read from disk again are slower).
PAGEABLE_FRACTION = 0.25


def pageable_bandwidth(card) -> float | None:
    """Bytes/s of a copy to the GPU from pageable memory for ``card`` (a :class:`~mlnb.planner.cost.CardFacts`):
    measured on the card, else the pinned bandwidth times :data:`PAGEABLE_FRACTION` (an assumption); None without
    either."""
    if card.pageable_bandwidth:
        return card.pageable_bandwidth
    return card.bandwidth * PAGEABLE_FRACTION if card.bandwidth else None


def with_mapped(card, step: float | None, nbytes: int, units: int, calibrated: bool = True) -> float | None:
    """``step`` (the step streaming the pinned units alone) with ``units`` more streamed units of ``nbytes`` in all
    copied from the mapping: their copies at the pageable bandwidth, none of them hidden (the host waits for a copy
    from pageable memory, so it stands on both chains), and their host time per unit, plus with ``calibrated`` the
    measured overhead per unit. None where a term is unknown."""
    if step is None or not units:
        return step
    pageable = pageable_bandwidth(card)
    if pageable is None:
        return None
    per_unit = (card.host_unit_seconds or 0.0) + ((card.unit_overhead or 0.0) if calibrated else 0.0)
    return step + nbytes / pageable + units * per_unit


def mapped_once_seconds(card, nbytes: int) -> float | None:
    """What copying ``nbytes`` of offloaded components (text encoders, VAE) once per image from the weight files'
    mapping costs beyond copying them from pinned memory; None without the bandwidths."""
    if not nbytes:
        return 0.0
    pageable = pageable_bandwidth(card)
    if pageable is None or not card.bandwidth:
        return None
    return nbytes / pageable - nbytes / card.bandwidth


def mapped_once_bytes(plan, model) -> int:
    """The bytes of ``plan``'s offloaded components (text encoders, VAE) left in the weight files' mapping."""
    sizes = dict(model.encoders, vae=model.vae)
    return sum(sizes.get(name, 0) for name in plan.mapped_models)


@functools.lru_cache(maxsize=8192)
def _packed(sizes: tuple[int, ...]) -> int:
    return packed_bytes(sizes)


def pinned_bytes(model, sizes: dict[str, int], streamed, offload_encoders_vae: bool, decode_offload=(),
                 mapped_units=(), mapped_models=()) -> int:
    """The page-locked host bytes a placement packs (:func:`.pinning.packed_bytes`: buffers of powers of two, one
    packing per model).

    Args:
        model: the pipeline's :class:`~mlnb.planner.cost.ModelFacts`.
        sizes: the denoiser's block bytes as stored (fp8 halves them: :func:`mlnb.planner.cost.stored_bytes`).
        streamed: the streamed blocks; those in ``mapped_units`` are left in the mapping.
        offload_encoders_vae: the text encoders' units and the VAE are pinned too, except those in
            ``mapped_models`` (by component name, ``"vae"`` for the VAE).
        decode_offload: kept blocks sent to their pinned host copy for the decode.
    """
    left = set(mapped_units)
    total = _packed(tuple(sizes[n] for n in streamed if n not in left))
    total += _packed(tuple(sizes[n] for n in decode_offload))
    if offload_encoders_vae:
        units = model.encoder_units or {}
        for name, nbytes in model.encoders.items():
            if name not in mapped_models:
                total += _packed(tuple(units.get(name) or (nbytes,)))
        if "vae" not in mapped_models:
            total += _packed((model.vae,))
    return total


def host_summary(plan) -> str:
    """Which of ``plan``'s host copies are pinned and which parts stay in the weight files' mapping, in a few words
    ("" for a plan that keeps nothing on the host)."""
    parts = []
    if plan.pinned_bytes:
        streamed = len(plan.streamed) - len(plan.mapped_units)
        what = ([f"{streamed} streamed blocks"] if streamed else []) + list(plan.pinned_models)
        what += [f"{len(plan.decode_offload)} decode blocks"] if plan.decode_offload else []
        parts.append(f"pinned {format_bytes(plan.pinned_bytes)} ({', '.join(what)})")
    if plan.mapped_bytes:
        what = list(plan.mapped_models)
        what += [f"{len(plan.mapped_units)} streamed blocks"] if plan.mapped_units else []
        parts.append(f"{format_bytes(plan.mapped_bytes)} left mapped from the files ({', '.join(what)})")
    return ", ".join(parts)
