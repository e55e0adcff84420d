"""The budget planner's search: the fastest placement of a pipeline's weights that fits a VRAM budget (pure; no
torch).

Candidates are every strategy (everything resident; the encoders and the VAE offloaded; part of the denoiser
streamed), with and without fp8 storage, untiled and in each VAE tile size; :mod:`mlnb.planner.cost` gives each its
peak and time. Blocks are kept resident first fit in one of two orders: blocks under :data:`MIN_STREAMED` first,
then largest first (the fewest bytes moved), and among blocks of one size spread evenly over the execution order so
that each copy has compute beside it; or, with a block timeline on the card, least compute per byte first, so that
the streamed blocks are those with the most compute to hide the next copies behind. With a timeline each order is
tried with two and three slots. Where the decode's peak is what limits the kept part (or forces small VAE tiles),
each placement that offloads the VAE is also tried with the largest kept blocks sent to their pinned host copy for
the decode (:func:`_decode_offload`), so that more stays resident for the steps and the VAE decodes in larger tiles
or untiled, for one copy of those blocks back to the GPU per image. With measured card facts the fastest plan that
fits wins; without them, the one that moves and transforms least (a decode offload only where nothing fits
without one).

Each placement that fits the GPU must also fit the host RAM it may pin (:func:`plan_for_budget`'s ``host``): where
its pinned copies (:func:`.cost.pinned_bytes`) do not, the fewest parts that make them fit are left in the weight
files' mapping, the offloaded components first (copied once per image), then the streamed units (copied at every
step), and the placement is timed with their copies from pageable memory.
"""

from __future__ import annotations

import dataclasses
import math

from ..units import GiB, MiB, format_bytes
from .cost import (
    TILES,
    Block,
    CardFacts,
    ModelFacts,
    Plan,
    Workload,
    peak_bytes,
    phase_terms,
    plan_step,
    reserves,
    room_needed,
    seconds_per_image,
    step_time,
    stored_bytes,
    stored_cuts,
    usable_bytes,
)
from .host_ram import mapped_once_seconds, pinned_bytes

__all__ = ["BudgetError", "plan_for_budget", "fit_host", "host_budget", "MIN_STREAMED", "HOST_MARGIN"]

# A streamed unit's copy is issued when the unit two places before it ends, so a tiny streamed unit (a transformer's
# norm or 1×1 projection, split off a block too large to stream whole) leaves the next large unit almost no compute
# to arrive behind. Blocks this small stay resident.
MIN_STREAMED = 8 * MiB


# Host RAM a default host budget leaves free beside the pinned copies: this much, or a tenth of the host's RAM when
# that is more. It holds what placing a pipeline reads in passing (a pinned buffer filled before its sources go back,
# the mapped pages read between two releases, a mapped unit's pages as it is copied) and what the notebook itself
# allocates afterwards (images, latents, the kernel's own objects).
HOST_MARGIN = 1 * GiB


class BudgetError(ValueError):
    """No placement fits the budget; the message says what would."""


def host_budget(total: int | None = None, available: int | None = None) -> int | None:
    """The host RAM a plan may pin by default: the host's available memory (read through the device layer unless
    given) less :data:`HOST_MARGIN` or a tenth of its total, whichever is more; None where the host's memory is
    unknown (no limit)."""
    if available is None:
        from ..device import host_memory

        total, available = host_memory()
    if available is None:
        return None
    return int(available - max(HOST_MARGIN, (total or 0) // 10))


def _fill(ranked: list[Block], other: int, fixed: int, den_res: int, slots: int, usable: float) -> list[Block]:
    """The blocks kept resident: each in ``ranked`` order that still fits beside those kept before it (first fit),
    counting the slots of the largest block left streamed. ``fixed`` is the larger of the encode and decode terms."""
    left: dict[int, int] = {}
    for block in ranked:
        left[block.nbytes] = left.get(block.nbytes, 0) + 1
    sizes = sorted(left, reverse=True)
    kept: list[Block] = []
    resident = other
    for block in ranked:
        left[block.nbytes] -= 1
        largest = next((n for n in sizes if left[n] > 0), 0)
        if resident + block.nbytes + max(fixed, slots * largest + den_res) <= usable:
            kept.append(block)
            resident += block.nbytes
        else:
            left[block.nbytes] += 1
    return kept


def _bit_reversed(index: int, bits: int) -> int:
    return int(f"{index:0{bits}b}"[::-1], 2) if bits else 0


def _residency_order(blocks: list[Block]) -> list[Block]:
    """The order in which blocks are kept resident: blocks under :data:`MIN_STREAMED` first (streaming them saves
    next to no memory and puts a copy turn between two large blocks), then largest first (the fewest bytes left to
    stream); among blocks of one size, by the bit-reversed position in execution order, so that any number kept, and
    the rest streamed, lie evenly spread (half of them: every other block) and each streamed block has resident
    compute beside it."""
    positions: dict[int, list[int]] = {}
    for index, block in enumerate(blocks):
        positions.setdefault(block.nbytes, []).append(index)
    rank = {}
    for indices in positions.values():
        bits = max(0, (len(indices) - 1).bit_length())
        for k, index in enumerate(indices):
            rank[index] = _bit_reversed(k, bits)
    order = sorted(range(len(blocks)), key=lambda i: (blocks[i].nbytes >= MIN_STREAMED, -blocks[i].nbytes, rank[i]))
    return [blocks[i] for i in order]


def _compute_order(blocks: list[Block], durations: dict[str, float]) -> list[Block]:
    """Blocks under :data:`MIN_STREAMED` first, then the least compute per byte first: those are kept resident, so
    the streamed blocks are the ones with the most compute to hide the next copies behind."""
    spread = {b.name: i for i, b in enumerate(_residency_order(blocks))}
    per_byte = {b.name: durations[b.name] / max(1, b.nbytes) for b in blocks}
    return sorted(blocks, key=lambda b: (b.nbytes >= MIN_STREAMED, per_byte[b.name], spread[b.name]))


def _residency_orders(blocks: list[Block], card: CardFacts):
    """Orders in which to keep blocks resident: by size, and, with a block timeline on the card, by compute per
    byte."""
    yield _residency_order(blocks)
    if card.block_timeline is not None:
        durations = {name: seconds for name, _, seconds in card.block_timeline[1]}
        if all(b.name in durations for b in blocks):
            yield _compute_order(blocks, durations)


def _decode_offload(kept: list[Block], kept_bytes: int, decode: int, usable: float) -> tuple[str, ...] | None:
    """The kept blocks to send to the host before the decode so that it fits beside the rest: the fewest, largest
    first (each one is a hook and a copy back); () when the decode fits beside all of them, None when it fits beside
    none (the denoiser's other bytes stay)."""
    need = kept_bytes + decode - usable
    if need <= 0:
        return ()
    chosen, freed = set(), 0
    for block in sorted(kept, key=lambda b: -b.nbytes):
        chosen.add(block.name)
        freed += block.nbytes
        if freed >= need:
            return tuple(b.name for b in kept if b.name in chosen)
    return None


def _candidates(budget: int, model: ModelFacts, card: CardFacts, work: Workload):
    usable = usable_bytes(budget, card)
    enc_total = sum(model.encoders.values())
    once = enc_total + model.vae
    for fp8 in (False, True):
        sizes, other, denoiser = stored_bytes(model, fp8)
        cuts = stored_cuts(model, fp8)
        blocks = [Block(name, nbytes) for name, nbytes in sizes.items()]
        every = tuple(sizes)
        whole = step_time(card, sizes, (), 2, fp8)
        for tile in (None, *TILES):
            if tile is not None and tile >= max(work.width, work.height):
                continue
            # Everything resident.
            yield Plan(budget, "resident", every, (), False, fp8, tile,
                       peak_bytes("resident", model, fp8, tile, every, (), work, card),
                       seconds_per_image(card, work, whole, 0, tile), 0)
            # Encoders and VAE on the GPU only while they run; the denoiser stays (all of it, or all but the blocks
            # that go to the host for the decode).
            encode, decode, den_res = phase_terms(model, tile, work, card)
            evicted = _decode_offload(blocks, denoiser, decode, usable)
            for off in ((), evicted) if evicted else ((),):
                off_bytes = sum(sizes[n] for n in off)
                yield Plan(budget, "offload encoders and VAE", every, (), True, fp8, tile,
                           peak_bytes("offload encoders and VAE", model, fp8, tile, every, (), work, card,
                                      decode_offload=off),
                           seconds_per_image(card, work, whole, once, tile, off_bytes), 0, once,
                           decode_offload=off, decode_offload_bytes=off_bytes)
            # Stream what does not fit, in each order of residency and with two or three slots; the decode beside
            # all that is kept, or beside what is left of it once the blocks it cannot hold have gone to the host.
            seen = set()
            for ranked in _residency_orders(blocks, card):
                for slots in (2, 3) if card.block_timeline else (2,):
                    for evicts in (False, True):
                        fixed = max(encode, model.vae) if evicts else max(encode, decode)
                        kept_blocks = _fill(ranked, other, fixed, den_res, slots, usable)
                        resident = {b.name for b in kept_blocks}
                        if len(resident) == len(blocks):
                            continue  # nothing to stream: the plans above cover it
                        kept = tuple(b.name for b in model.blocks if b.name in resident)
                        off = ()
                        if evicts:
                            ordered = [Block(n, sizes[n]) for n in kept]
                            off = _decode_offload(ordered, other + sum(sizes[n] for n in kept), decode, usable)
                            if not off:
                                continue  # the decode fits beside the kept part (or beside none of it)
                        moved_names = tuple(b.name for b in model.blocks if b.name not in resident)
                        if (moved_names, slots, off) in seen:
                            continue
                        seen.add((moved_names, slots, off))
                        moved = sum(sizes[n] for n in moved_names)
                        off_bytes = sum(sizes[n] for n in off)
                        step, split = _ring_step(card, sizes, moved_names, slots, fp8, cuts)
                        yield Plan(
                            budget, "stream", kept, moved_names, True, fp8, tile,
                            peak_bytes("stream", model, fp8, tile, kept, moved_names, work, card, slots, off),
                            seconds_per_image(card, work, step, once, tile, off_bytes),
                            moved, once, slots=slots, decode_offload=off, decode_offload_bytes=off_bytes,
                            split_units=split,
                        )


def _ring_step(card: CardFacts, sizes: dict[str, int], streamed, slots: int, fp8: bool, cuts) -> tuple:
    """``(step, split)``: the step streaming ``streamed`` with whole blocks in the ring, or with the blocks that pass
    its end split (``split`` True) where the schedule replay against the card's timeline finds that faster. Filling
    the ring's end packs the blocks tighter, so each copy overwrites more recently used bytes and may wait longer
    for them: either can be faster, and only the replay tells (without a timeline, whole blocks)."""
    whole = step_time(card, sizes, streamed, slots, fp8)
    if not cuts or card.block_timeline is None or whole is None:
        return whole, False
    split = step_time(card, sizes, streamed, slots, fp8, cuts)
    return (split, True) if split is not None and split < whole else (whole, False)


_PREFERENCE = {"resident": 0, "offload encoders and VAE": 1, "stream": 2}


def _offloaded(plan: Plan, model: ModelFacts) -> tuple[str, ...]:
    """The components ``plan`` keeps on the host between their runs (text encoders, then ``"vae"``), by name."""
    if not plan.offload_encoders_vae:
        return ()
    return tuple(model.encoders) + (("vae",) if model.vae else ())


def _mapped_once(plan: Plan, model: ModelFacts) -> int:
    sizes = dict(model.encoders, vae=model.vae)
    return sum(sizes.get(name, 0) for name in plan.mapped_models)


def fit_host(plan: Plan, model: ModelFacts, card: CardFacts, work: Workload, host: int | None) -> Plan | None:
    """``plan`` (a placement on the GPU) with its host copies counted (:func:`.host_ram.pinned_bytes`): as it is
    where they fit ``host`` bytes (or ``host`` is None), else with the fewest parts left in the weight files' mapping
    that make them fit, in the order :func:`plan_for_budget` gives, its time charged for their pageable copies; None
    where even everything left mapped does not fit."""
    offloaded = _offloaded(plan, model)
    sizes, _, _ = stored_bytes(model, plan.fp8)
    whole = dict(model.encoders, vae=model.vae)
    # what may be left mapped, cheapest first: components copied once per image, then units copied at every step
    order = [("model", n) for n in sorted(offloaded, key=lambda n: -whole[n])]
    order += [("unit", n) for _, _, n in sorted((-sizes[n], -i, n) for i, n in enumerate(plan.streamed))]

    def variant(count: int) -> Plan:
        models = tuple(n for kind, n in order[:count] if kind == "model")
        chosen = set(order[:count])
        units = tuple(n for n in plan.streamed if ("unit", n) in chosen)
        pinned = pinned_bytes(model, sizes, plan.streamed, plan.offload_encoders_vae, plan.decode_offload, units,
                              models)
        return dataclasses.replace(
            plan, pinned_bytes=pinned, host_budget=host, pinned_models=tuple(n for n in offloaded if n not in models),
            mapped_models=models, mapped_units=units,
            mapped_bytes=sum(whole[n] for n in models) + sum(sizes[n] for n in units),
        )

    first = variant(0)
    if host is None or first.pinned_bytes <= host:
        return first
    if variant(len(order)).pinned_bytes > host:
        return None
    low, high = 0, len(order)  # pinned(low) > host >= pinned(high): the fewest parts left mapped that fit
    while high - low > 1:
        middle = (low + high) // 2
        if variant(middle).pinned_bytes <= host:
            high = middle
        else:
            low = middle
    chosen = variant(high)
    once = mapped_once_seconds(card, _mapped_once(chosen, model))
    seconds = seconds_per_image(card, work, plan_step(chosen, model, card), chosen.transfer_once_bytes,
                                chosen.vae_tile, chosen.decode_offload_bytes)
    return dataclasses.replace(chosen, predicted_seconds=seconds + once if None not in (seconds, once) else None)


def plan_for_budget(budget: int, model: ModelFacts, card: CardFacts | None = None,
                    work: Workload | None = None, host: float | None = None) -> Plan:
    """The fastest plan predicted to fit ``budget`` bytes of GPU memory and ``host`` bytes of pinned host memory.

    With measured card facts, plans are ranked by predicted time; without them, by how little they move and
    transform (resident, then offloaded encoders/VAE, then streaming with the most bytes resident; no fp8 or tiling
    unless needed to fit; offloaded components left in the weight files' mapping before fp8, and streamed units left
    there only after it).

    Each placement's host copies are counted as they are pinned (:func:`.cost.pinned_bytes`). Where they exceed
    ``host``, the offloaded components (text encoders, then the VAE, largest first: each is copied once per image)
    and then the streamed units (largest first: copied at every step) are left in the files' mapping, copied from
    pageable memory, until the rest fits.

    Args:
        budget: GPU bytes.
        model, card, work: the pipeline's weights, the card's measured facts, the image.
        host: the host RAM the plan may pin, in bytes; None (or ``math.inf``): no limit. A load passes the host's
            available memory less a margin (:func:`host_budget`; the search itself reads nothing of the machine).

    Raises:
        BudgetError: nothing fits; the message gives the smallest budget that would, and a smaller size, or, where
            placements fit the GPU but none the host RAM, the pinned bytes the least of them needs.

    Example:
        ```python
        >>> plan = plan_for_budget(4 * GiB, facts, CardFacts(bandwidth=20e9, step_seconds=0.07), Workload(1024, 1024))
        >>> print(plan)
        ```
    """
    card = card or CardFacts()
    work = work or Workload()
    if host is not None and math.isinf(host):
        host = None
    plans = list(_candidates(budget, model, card, work))
    on_gpu = [p for p in plans if p.predicted_peak <= usable_bytes(budget, card)]
    fitting = [v for v in (fit_host(p, model, card, work, host) for p in on_gpu) if v is not None]
    if on_gpu and not fitting:
        least = min(pinned_bytes(model, stored_bytes(model, p.fp8)[0], p.streamed, p.offload_encoders_vae,
                                 p.decode_offload, p.streamed, _offloaded(p, model)) for p in on_gpu)
        raise BudgetError(
            f"no placement fits {format_bytes(budget)} of GPU memory with {format_bytes(max(0, host))} of host RAM "
            f"to pin for {work.width}×{work.height}: the least pinned of those that fit the GPU needs "
            f"{format_bytes(least, up=True)} with everything streamed left in the weight files' mapping; free host "
            f"RAM (a margin of {format_bytes(HOST_MARGIN)} or a tenth of the RAM stays free beside the pinned copies)"
        )
    if not fitting:
        smallest = min(plans, key=lambda p: p.predicted_peak)
        need = room_needed(smallest.predicted_peak, card)
        smaller = ""
        side = (min(work.width, work.height) - 1) // 64 * 64
        while side >= 64:  # the largest smaller square that the planner finds a fitting placement for
            fits = dataclasses.replace(work, width=side, height=side)
            if any(p.predicted_peak <= usable_bytes(budget, card) for p in _candidates(budget, model, card, fits)):
                smaller = f", or make the image {side}×{side} or smaller"
                break
            side -= 64
        whole = "" if model.blocks else " (the denoiser has no block list to stream: it is planned as a whole)"
        raise BudgetError(
            f"no placement fits {format_bytes(budget)} for {work.width}×{work.height} ×{work.batch}{whole}: the smallest "
            f"needs {format_bytes(need, up=True)} (activation reserve {format_bytes(reserves(work, None, card)[0])}); "
            f"give at least {format_bytes(need, up=True)}{smaller}"
        )

    def rank(p: Plan):
        known = p.predicted_seconds is not None
        mapped_step_bytes = p.mapped_bytes - _mapped_once(p, model)
        structural = (mapped_step_bytes > 0, p.fp8, bool(p.decode_offload), p.vae_tile is not None,
                      _PREFERENCE[p.strategy], p.streamed_bytes, mapped_step_bytes, p.mapped_bytes, p.slots,
                      -(p.vae_tile or 0))
        return (0, p.predicted_seconds, structural) if known else (1, 0.0, structural)

    return min(fitting, key=rank)
