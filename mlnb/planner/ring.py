"""Where streamed units sit in the GPU ring and when each copy into it may start (pure: no torch, no device).

The streamer (:mod:`.streaming`) keeps the streamed units of a model in one GPU buffer, the ring, of ``slots ×``
the largest unit's bytes (the planner's memory model). The units are laid out in it once, in the order the first
forward ran them, one after the other; a unit that does not fit before the ring's end starts again at byte 0 (its
tensors are views into one contiguous stretch). So every unit has a fixed offset, and its parameters can point at
their views of the ring for a whole phase (the steps of one image) instead of being swapped at every entry and exit.

The forward runs the units as uses ``0, 1, 2, ...``: use ``j`` is unit ``j mod n`` (``n`` units a forward), and with
kept memory the count goes on from one forward into the next. The copy for use ``j`` may start once every earlier use
of the bytes it overwrites has computed; the compute runs in order, so that is once the latest earlier use whose
bytes overlap it has (its *blocker*). Copies are issued in use order, each as soon as its blocker has computed: the
ring, not a fixed distance, sets how far ahead a copy runs, across the end of a forward into the next.

A unit whose bytes no other unit shares (all of them, when the ring holds every unit) is copied once, in the first
forward, and stays: later uses find it in place. The others share bytes, overwrite each other in turn, and are copied
for every use.

:func:`cost.schedule_step <mlnb.planner.cost.schedule_step>` replays the same rule against a timeline of the
compute, so the planner's prediction follows the streamer's copies.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RingLayout", "ring_layout"]


@dataclass(frozen=True)
class RingLayout:
    """The ring's bytes, each unit's offset and size (in running order), and the copy rule derived from them.

    ``back[p]`` is how many uses before a use of unit ``p`` its blocker runs (1 to ``n - 1``), or None for a unit
    that shares its bytes with no other. ``shared[p]`` says whether unit ``p`` is copied for every use."""

    capacity: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    back: tuple[int | None, ...]

    @property
    def count(self) -> int:
        return len(self.sizes)

    def shared(self, position: int) -> bool:
        return self.back[position] is not None

    def needs_copy(self, use: int) -> bool:
        """Whether use ``use`` copies its unit: every use of a unit that shares bytes, the first of any other."""
        return use < self.count or self.shared(use % self.count)

    def computed_before(self, use: int) -> int:
        """How many uses must have computed before the copy for ``use`` may start: its blocker and every use before
        it; 0 when none has (a unit whose bytes nothing used before it since the ring was allocated)."""
        back = self.back[use % self.count]
        return 0 if back is None else max(0, use - back + 1)

    def blocker(self, use: int) -> int | None:
        """The use whose compute the copy for ``use`` waits for, or None."""
        needed = self.computed_before(use)
        return needed - 1 if needed else None

    def next_copy(self, use: int) -> int | None:
        """The first use from ``use`` on that copies, within one forward's uses; None if none does (every unit stays
        in the ring once copied)."""
        for candidate in range(use, use + self.count):
            if self.needs_copy(candidate):
                return candidate
        return None


def _overlap(a: int, size_a: int, b: int, size_b: int) -> bool:
    return a < b + size_b and b < a + size_a


def ring_layout(sizes, capacity: int) -> RingLayout:
    """Lay units of ``sizes`` bytes (in running order) out in a ring of ``capacity`` bytes.

    Args:
        sizes: each unit's bytes, in the order the forward runs them.
        capacity: the ring's bytes, at least the largest unit's.

    Raises:
        ValueError: a unit larger than the ring.
    """
    sizes = tuple(int(s) for s in sizes)
    if sizes and max(sizes) > capacity:
        raise ValueError(f"a ring of {capacity} bytes cannot hold a unit of {max(sizes)} bytes")
    offsets, at = [], 0
    for size in sizes:
        if at + size > capacity:
            at = 0
        offsets.append(at)
        at += size
    count = len(sizes)
    back: list[int | None] = []
    for p in range(count):
        found = None
        for distance in range(1, count):  # the latest use before p, cyclically, whose bytes overlap p's
            q = (p - distance) % count
            if _overlap(offsets[p], sizes[p], offsets[q], sizes[q]):
                found = distance
                break
        back.append(found)
    return RingLayout(capacity, tuple(offsets), sizes, tuple(back))
