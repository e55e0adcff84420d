"""Where streamed units sit in the GPU ring, which of them the streamer enters and leaves as one group, and when each
copy into the ring may start (pure: no torch, no device).

The streamer (:mod:`.streaming`) keeps the streamed units of a model in one GPU buffer, the ring, of ``slots ×``
the largest unit's bytes (the planner's memory model). The units are laid out in it once, in the order the first
forward ran them, one after the other. A unit that does not fit before the ring's end starts again at byte 0,
leaving the end unused for that lap; or, given its cuts, it is split between two of its tensors (each tensor stays
contiguous): the tensors that fit fill the ring's end and the rest start again at byte 0, so the unit arrives in two
copies. Where no split fits (a unit whose first tensor alone passes the end, or whose rest would reach its own first
part), the whole unit starts again at byte 0. Splitting leaves less of the ring unused but packs the units tighter,
so a copy overwrites bytes used more recently and may wait longer for them: the planner replays both layouts against
the card's block timeline, and the plan says which the streamer uses (``split_units``; ``docs/planner.md``). So
every unit has a fixed place, and its parameters can point at their views of the ring for a whole phase (the steps
of one image) instead of being swapped at every entry and exit.

What the end of the ring leaves unused, as a share of the bytes the ring passes through in one forward, whole units
against split ones (``python scripts/ring_waste.py``: the planner's plans without card facts at the native size, fp16
weights, the units' real layouts built on the meta device; versions and date in ``docs/planner.md``):

=====================  ==============  =============
ring                   whole           split
=====================  ==============  =============
SD1.5 denoiser         12.4–12.5 %     3.5–9.0 %
SDXL denoiser          2.4–4.9 %       0.6–1.1 %
SD3.5 medium denoiser  8.4–12.9 %      0.4–1.2 %
SD3.5 large denoiser   12.0–19.1 %     8.5–19.1 %
FLUX.1 denoiser        5.1–10.5 %      5.1–10.5 %
CLIP-G / T5-XXL        5.3 % / 26.1 %  1.8 % / 8.0 %
=====================  ==============  =============

(SD3.5 large's and FLUX.1's units are mostly one or two large tensors, which leave the split no place to fall.) The
layout starts again at byte 0 with each forward, so the space after the forward's last unit stays unused too, 0–11
points more with the split (``+end`` in the script's table): closing that gap would take a layout that shifts by a
forward's bytes at every step.

Consecutive units that run with nothing of the model between them (no module with weights of its own: a text
encoder's layers, a run of streamed blocks) form *groups* of at most :data:`GROUP_SHARE` of the ring. The streamer
waits for a group's copies as its first unit starts and marks the group computed after its last one, so a group
costs the host one wait and one mark instead of one a unit. The price is overlap: the group's first unit waits for
its last unit's copy, and the group's bytes are freed only once its last unit has computed. A quarter of the ring is
the largest share at which the planner's schedule replay of the same plans shows no cost (half of it costs SDXL's
3 GiB plan 3 % of its step where compute and copies take as long; ``docs/planner.md``). A group never holds two units
whose bytes overlap.

The forward runs the units as uses ``0, 1, 2, ...``: use ``j`` is unit ``j mod n`` (``n`` units a forward), and with
kept memory the count goes on from one forward into the next. The copy for use ``j`` may start once every earlier use
of the bytes it overwrites has computed; the compute runs in order, so that is once the latest earlier use whose
bytes overlap it (its *blocker*) has, which the streamer learns at the end of the blocker's group. Copies are issued
in use order, each as soon as its blocker's group has computed: the ring, not a fixed distance, sets how far ahead a
copy runs, across the end of a forward into the next.

A unit whose bytes no other unit shares (all of them, when the ring holds every unit) is copied once, in the first
forward, and stays: later uses find it in place. The others share bytes, overwrite each other in turn, and are copied
for every use.

:func:`cost.schedule_step <mlnb.planner.cost.schedule_step>` replays the same rule against a timeline of the
compute, so the planner's prediction follows the streamer's copies.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GROUP_SHARE", "RingLayout", "ring_layout"]

GROUP_SHARE = 1 / 4  # a group's bytes, at most, as a share of the ring


@dataclass(frozen=True)
class RingLayout:
    """The ring's bytes, each unit's place and size (in running order), its groups, and the copy rule derived from
    them.

    ``offsets[p]`` is where unit ``p`` starts; ``cuts[p]`` the bytes of it that fill the ring up to its end when it
    is split (the rest at byte 0), else None. ``back[p]`` is how many uses before a use of unit ``p`` its blocker
    runs (1 to ``n - 1``), or None for a unit that shares its bytes with no other; ``waits[p]`` how many uses before
    it the blocker's group ends (what its copy waits for). ``groups`` lists each group's first and last unit."""

    capacity: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    back: tuple[int | None, ...]
    cuts: tuple[int | None, ...]
    groups: tuple[tuple[int, int], ...]
    waits: tuple[int | None, ...]

    @property
    def count(self) -> int:
        return len(self.sizes)

    def pieces(self, position: int) -> tuple[tuple[int, int], ...]:
        """``(ring offset, bytes)`` of each piece of unit ``position``: one, or two where it is split."""
        cut = self.cuts[position]
        start, size = self.offsets[position], self.sizes[position]
        return ((start, size),) if cut is None else ((start, cut), (0, size - cut))

    def shared(self, position: int) -> bool:
        return self.back[position] is not None

    def needs_copy(self, use: int) -> bool:
        """Whether use ``use`` copies its unit: every use of a unit that shares bytes, the first of any other."""
        return use < self.count or self.shared(use % self.count)

    def computed_before(self, use: int) -> int:
        """How many uses must have computed before the copy for ``use`` may start: its blocker's group and every use
        before it; 0 when none has (a unit whose bytes nothing used before it since the ring was allocated)."""
        wait = self.waits[use % self.count]
        return 0 if wait is None else max(0, use - wait + 1)

    def blocker(self, use: int) -> int | None:
        """The use whose compute the copy for ``use`` waits for (the last of its blocker's group), or None."""
        needed = self.computed_before(use)
        return needed - 1 if needed else None


def _intervals(start: int, size: int, cut: int | None, capacity: int) -> list[tuple[int, int]]:
    return [(start, start + size)] if cut is None else [(start, capacity), (0, size - cut)]


def _overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    return any(x0 < y1 and y0 < x1 for x0, x1 in a for y0, y1 in b)


def _place(sizes: tuple[int, ...], capacity: int, cuts) -> tuple[list[int], list[int | None]]:
    offsets: list[int] = []
    split: list[int | None] = []
    at = 0
    for position, size in enumerate(sizes):
        cut = None
        if at + size > capacity:
            room = capacity - at
            # the most tensors that fit before the end, their rest at byte 0 short of this unit's own first part
            fitting = [c for c in (cuts[position] if cuts else ()) if 0 < c <= room and size - c <= at]
            cut = max(fitting, default=None)
            if cut is None:
                at = 0
        offsets.append(at)
        split.append(cut)
        at = size - cut if cut is not None else at + size
    return offsets, split


def _groups(sizes, adjacent, limit: int, back) -> list[tuple[int, int]]:
    """Runs of adjacent units of at most ``limit`` bytes in all, none of whose bytes overlap an earlier one's in the
    run (its blocker runs before the run starts)."""
    groups: list[tuple[int, int]] = []
    first = 0
    for position in range(1, len(sizes) + 1):
        if position < len(sizes) and adjacent and adjacent[position - 1] \
                and sum(sizes[first:position + 1]) <= limit \
                and (back[position] is None or back[position] > position - first):
            continue
        groups.append((first, position - 1))
        first = position
    return groups


def ring_layout(sizes, capacity: int, cuts=None, adjacent=None, group_share: float = GROUP_SHARE) -> RingLayout:
    """Lay units of ``sizes`` bytes (in running order) out in a ring of ``capacity`` bytes, and group them.

    Args:
        sizes: each unit's bytes, in the order the forward runs them.
        capacity: the ring's bytes, at least the largest unit's.
        cuts: for each unit, the offsets in it where a split may fall (where its tensors after the first start);
            without them no unit is split.
        adjacent: for each unit, whether the next one runs right after it, with nothing of the model between;
            without it every unit is a group of its own.
        group_share: a group's bytes, at most, as a share of ``capacity``.

    Raises:
        ValueError: a unit larger than the ring.
    """
    sizes = tuple(int(s) for s in sizes)
    if sizes and max(sizes) > capacity:
        raise ValueError(f"a ring of {capacity} bytes cannot hold a unit of {max(sizes)} bytes")
    offsets, split = _place(sizes, capacity, cuts)
    count = len(sizes)
    intervals = [_intervals(offsets[p], sizes[p], split[p], capacity) for p in range(count)]
    back: list[int | None] = []
    for p in range(count):
        found = None
        for distance in range(1, count):  # the latest use before p, cyclically, whose bytes overlap p's
            q = (p - distance) % count
            if _overlap(intervals[p], intervals[q]):
                found = distance
                break
        back.append(found)
    groups = _groups(sizes, adjacent, int(capacity * group_share), back)
    last = [0] * count
    for first, end in groups:
        for p in range(first, end + 1):
            last[p] = end
    # the blocker q = p - back (cyclically) is known computed once its group's last unit has run
    waits = [None if d is None else d - (last[(p - d) % count] - (p - d) % count) for p, d in enumerate(back)]
    return RingLayout(capacity, tuple(offsets), sizes, tuple(back), tuple(split), tuple(groups), tuple(waits))
