"""The streamer's ring: units at fixed offsets, each copy issued as soon as its bytes are free, waited for before the
unit runs, the ring allocated once a phase and the parameters bound to it once.

On the CPU every copy is done when it is issued; the fake device's simulated copy streams log the order of copies,
waits and marks of the compute, which on a GPU is what keeps a copy from overwriting bytes that queued kernels still
read. A wrong order also changes the output here, since each copy lands at once.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from fakes import calls_a_twice, in_runs, interleaved, log_runs
from mlnb.planner import stream_units
from mlnb.planner.ring import ring_layout
from mlnb.testing.fake_device import SimulatedCopyStreams


def _streamed(sizes=(8, 16, 8, 32, 8, 16), keep: bool = False, slots: int = 2, model=None, **options):
    """A model (``interleaved(sizes)`` unless given) streamed through simulated copy streams, each unit logged as it
    runs: the model, unit names, an input, the unstreamed output for it, the copy streams and the streamer, the order
    already recorded."""
    model = interleaved(sizes) if model is None else model
    names = [f"streamed.{i}" for i in range(len(model.streamed))]
    x = torch.randn(3, 8)
    expected = model(x)
    copies = SimulatedCopyStreams()
    log_runs(model, names, copies.log)
    streamer = stream_units(model, names, torch.device("cpu"), copies, stream=copies.copy_stream(), keep_slots=keep,
                            slots=slots, **options)
    assert torch.equal(model(x), expected)  # the first forward records the order, copying blocking
    assert streamer.order == names
    copies.log.clear()
    return model, names, x, expected, copies, streamer


def _check_ring(log, streamer) -> None:
    """Replay a log against the ring, byte by byte: a unit runs only from its place in the ring, with every piece of
    its copy there, waited for, and not overwritten since; a copy waits for the compute of every unit whose bytes it
    overwrites (its ``after`` event was marked after their last run). Copies go on one copy stream, so a wait for one
    copy waits for every copy issued before it."""
    layout, order = streamer.layout, streamer.order
    piece_of = {}  # host address of a piece -> (position, piece, its ring interval)
    for position, name in enumerate(order):
        at = 0
        for index, (start, size) in enumerate(layout.pieces(position)):
            piece_of[streamer.units[name].region.data_ptr() + at] = (position, index, (start, start + size))
            at += size
    base = None
    held: dict[int, dict[int, int]] = {}  # position -> {piece: index of its copy in the log}, while its bytes hold it
    last_run: dict[int, int] = {}  # position -> index in the log of its last run
    marked: dict[int, int] = {}  # id(event) -> index in the log of its last mark
    recorded: dict[int, int] = {}  # id(event) -> index in the log of the last copy that records it
    waited = -1  # copies up to this index in the log are waited for

    def overlaps(interval, q):
        return any(interval[0] < end and start < interval[1]
                   for start, end in ((s, s + size) for s, size in layout.pieces(q)))

    for index, event in enumerate(log):
        if event[0] == "buffer":
            base, held, last_run = None, {}, {}
        elif event[0] == "copy":
            position, piece, interval = piece_of[event[2]]
            if base is None:
                base = event[1] - interval[0]
            assert event[1] - base == interval[0], "a copy lands where its unit is not laid out"
            after = event[3]
            for other in [q for q in set(held) | set(last_run) if q != position and overlaps(interval, q)]:
                if other in last_run and after is not None:  # its compute is done before its bytes are overwritten
                    assert marked.get(id(after), -1) > last_run[other], \
                        f"copy of {order[position]} overwrites {order[other]} before its compute is marked done"
                held.pop(other, None)
            if piece == 0:
                held[position] = {}
            held.setdefault(position, {})[piece] = index
            recorded[id(event[4])] = index
        elif event[0] == "wait":
            waited = max(waited, recorded.get(id(event[1]), -1))
        elif event[0] == "mark":
            marked[id(event[1])] = index
        elif event[0] == "run" and event[1] in streamer.units:
            position = order.index(event[1])
            assert len(held.get(position, {})) == len(layout.pieces(position)), \
                f"{event[1]} ran from bytes that no longer hold it"
            assert max(held[position].values()) <= waited, f"{event[1]} ran before its copy was waited for"
            last_run[position] = index


def test_the_layout_puts_units_one_after_the_other_and_back_at_zero_where_one_would_pass_the_end():
    ring = ring_layout([3, 1, 1, 1, 3, 1], capacity=6)
    assert ring.offsets == (0, 3, 4, 5, 0, 3)
    # s4 overwrites s0 (four places back), s5 overwrites s1; s2 and s3 share their bytes with nothing: copied once
    assert ring.back == (2, 2, None, None, 4, 4)
    assert [ring.needs_copy(use) for use in range(6, 12)] == [True, True, False, False, True, True]
    assert ring.blocker(4) == 0 and ring.blocker(10) == 6 and ring.blocker(6) == 4  # s0 again once s4 has run
    assert ring.blocker(0) is None and ring.blocker(1) is None  # the first forward: nothing there before
    assert ring_layout([2, 2], capacity=4).back == (None, None)  # the ring holds every unit: each copied once
    with pytest.raises(ValueError, match="cannot hold"):
        ring_layout([5], capacity=4)


def test_a_unit_that_would_pass_the_ring_s_end_is_split_between_two_of_its_tensors():
    ring = ring_layout([3, 2, 3], capacity=6, cuts=[(1, 2), (1,), (1, 2)])
    assert ring.offsets == (0, 3, 5) and ring.cuts == (None, None, 1)
    assert ring.pieces(2) == ((5, 1), (0, 2))  # its first tensor fills the end, the rest starts at byte 0
    assert ring.back == (1, None, 2)  # s2's rest overwrites s0; s1 shares its bytes with nothing
    # no split where the first tensor alone passes the end, or where the rest would reach the unit's own first part
    assert ring_layout([3, 2, 3], 6, cuts=[(), (), (2,)]).offsets == (0, 3, 0)
    assert ring_layout([1, 6], 6, cuts=[(), (2,)]).cuts == (None, None)
    assert ring_layout([3, 2, 3], 6).cuts == (None, None, None)  # without cuts, nothing is split


def test_adjacent_units_form_groups_of_at_most_their_share_of_the_ring_and_copies_wait_for_a_group_s_end():
    adjacent = [True] * 7 + [False]
    ring = ring_layout([1, 1, 1, 1, 4, 1, 1, 1], capacity=8, adjacent=adjacent, group_share=0.5)
    assert ring.groups == ((0, 3), (4, 4), (5, 7))
    # s0 of the next forward overwrites s5 (three uses back) and waits for its group's end, s7 (one back)
    assert ring.back[0] == 3 and ring.computed_before(8) == 8 and ring.blocker(8) == 7
    assert ring.computed_before(5) == 4  # s5 overwrites s0, whose group ends with s3
    assert ring_layout([1, 1, 1, 1, 4, 1, 1, 1], 8, adjacent=adjacent, group_share=0.25).groups == (
        (0, 1), (2, 3), (4, 4), (5, 6), (7, 7))
    assert ring_layout([1] * 8, 8, group_share=1.0).groups == tuple((p, p) for p in range(8))  # none adjacent
    # a group ends before a unit whose bytes overlap an earlier unit's of the group: s4 overwrites s1 (s2 started
    # again at byte 0), though the four fit the share
    assert ring_layout([4, 1, 2, 2, 1], 6, adjacent=[False, True, True, True, False], group_share=1.0).groups == (
        (0, 0), (1, 3), (4, 4))


def test_each_copy_is_issued_as_soon_as_its_bytes_are_free_and_waited_for_before_its_unit_runs():
    """Two large units and small ones between them: the ring (two of the largest) holds the small ones beside a large
    one, so the second large unit's copy goes as soon as the first has computed, four units ahead, where fixed slots
    would have had it wait two units ahead."""
    model, names, x, expected, copies, streamer = _streamed(sizes=(32, 8, 8, 8, 32, 8))
    ring = streamer.layout
    assert ring.offsets[4] == 0 and ring.back[4] == 4
    for _ in range(2):
        copies.log.clear()
        assert torch.equal(model(x), expected)
        _check_ring([("buffer", 0)] + copies.log, streamer)
        log = copies.log
        assert copies.entries("buffer") == [("buffer", streamer.ring_bytes)]  # one ring a forward (not kept)
        copied = [streamer.order[[u.region.data_ptr() for u in streamer.units.values()].index(c[2])]
                  for c in copies.entries("copy")]
        assert copied == names  # every unit once, in running order, each into its own place
        s4 = next(i for i, e in enumerate(log) if e[0] == "copy" and e[2] == streamer.units[names[4]].region.data_ptr())
        mark_s0 = log.index(("mark", streamer._computed[0]))
        assert log[s4][3] is streamer._computed[0] and s4 == mark_s0 + 1  # right after s0's compute is marked
        assert s4 < log.index(("run", names[1]))  # four units ahead
        assert streamer.units_on_device() == () and streamer.ring is None  # home, and the ring dropped, after
    assert copies.events_made == 2 * len(names)  # two a unit, made once when the order was recorded


@pytest.mark.parametrize("count, slots", [(5, 2), (5, 3), (6, 3), (7, 3), (2, 3), (7, 2)])
def test_a_kept_ring_is_allocated_once_its_copies_wrap_into_the_next_forward_and_nothing_is_overwritten(count, slots):
    sizes = [8, 16, 32, 8, 16, 8, 32][:count]
    model, names, x, expected, copies, streamer = _streamed(sizes=sizes, keep=True, slots=slots)
    made = copies.events_made
    for _ in range(4):
        assert torch.equal(model(x), expected)
    _check_ring(copies.log, streamer)
    assert copies.entries("buffer") == [("buffer", streamer.ring_bytes)]  # once, for the four steps
    assert streamer.ring_bytes == min(slots, count) * streamer.slot_bytes
    assert copies.events_made == made  # no event made per step
    ring = streamer.layout
    ahead = set()  # the next forward's copies whose bytes this one has freed, in running order
    for use in range(4 * count, 5 * count):
        if ring.needs_copy(use):
            if ring.computed_before(use) > 4 * count:
                break
            ahead.add(use % count)
    assert streamer.pending_copies == ahead  # issued during this forward, on their way for the next
    # after the first forward only units that share bytes copy again, and the next forward's first ones already have;
    # a unit split across the ring's end is two copies
    uses = [use for use in range(4 * count) if ring.needs_copy(use)] + sorted(ahead)
    assert len(copies.entries("copy")) == sum(len(ring.pieces(use % count)) for use in uses)
    assert len(copies.entries("mark")) == 4 * count
    with pytest.raises(ValueError, match="two slots"):
        stream_units(interleaved(), ["streamed.0"], torch.device("cpu"), copies, slots=1)


def test_adjacent_units_are_entered_as_one_group_with_one_wait_and_left_with_one_mark_and_a_split_unit_works():
    """Runs of three units with nothing between them: a group each (the share allows any size here), one wait
    for the group's copies as its first unit starts and one mark after its last; the unit that passes the ring's end
    arrives in two copies, its tensors in two stretches of the ring (with ``split``: the plan asks for it where the
    replay finds it faster; else the unit starts again at byte 0). Nothing is overwritten before it has computed."""
    whole = _streamed(model=in_runs(), keep=True, group_share=1.0)[-1].layout
    assert whole.cuts == (None,) * 8 and whole.offsets[4] == 0
    model, names, x, expected, copies, streamer = _streamed(model=in_runs(), keep=True, group_share=1.0, split=True)
    ring = streamer.layout
    assert ring.groups == ((0, 2), (3, 5), (6, 7))
    assert ring.cuts[4] == 1024 and all(cut is None for p, cut in enumerate(ring.cuts) if p != 4)
    assert copies.events_made == len(names) + len(ring.groups)  # a copy event a unit, a compute event a group
    ready = []
    streamer.on_ready = ready.append
    for _ in range(4):
        assert torch.equal(model(x), expected)
    _check_ring(copies.log, streamer)
    assert ready == [names[0], names[3], names[6]] * 4  # a group's first unit, once its copies are waited for
    assert len(copies.entries("mark")) == 4 * len(ring.groups)
    assert len(copies.entries("wait")) <= 4 * len(ring.groups)
    split = streamer.units[names[4]]
    start = streamer.ring.data_ptr()
    assert [t.data_ptr() - start for t in split.tensors] == [5120, 0, 512, 1536]  # [5120, 6144) and [0, 2048)


@pytest.mark.parametrize("skipped", [0, 1, 2])
def test_a_unit_of_a_group_that_does_not_run_puts_the_later_units_on_blocking_copies(skipped, caplog):
    """A group's first, middle or last unit skipped in one forward: the units after it run from copies of their own
    (the group's wait or mark never happened), the output is the model's without it, and the next forwards find
    the ring as it was or start its copies afresh (when part of the group ran)."""
    model, names, x, expected, copies, streamer = _streamed(model=in_runs(), keep=True, group_share=1.0, split=True)
    model(x)
    reference = in_runs()
    reference.streamed[skipped] = torch.nn.Identity()
    unit = model.streamed[skipped]
    model.streamed[skipped] = torch.nn.Identity()
    before = len(copies.log)
    with caplog.at_level("WARNING"):
        assert torch.equal(model(x), reference(x))
    assert "ran out of its recorded order" in caplog.text
    during = copies.log[before:]
    model.streamed[skipped] = unit
    assert torch.equal(model(x), expected) and torch.equal(model(x), expected)
    # the units after the skipped one ran from copies of their own (logged right before each), the others from the ring
    own = [e for i, e in enumerate(during) if e[0] == "run" and i and during[i - 1][0] == "own copy"]
    assert [e[1] for e in own] == names[skipped + 1:]
    log = copies.log[:before] + [e for e in during if e not in own] + copies.log[before + len(during):]
    _check_ring(log, streamer)


def test_parameters_are_bound_to_the_ring_once_a_phase_and_home_after_it():
    model, names, x, expected, copies, streamer = _streamed(keep=True)
    made = []
    as_strided = torch.Tensor.as_strided

    def counting(self, *args, **kwargs):
        made.append(1)
        return as_strided(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "as_strided", counting)
        assert torch.equal(model(x), expected)
        views = len(made)
        assert views == sum(len(u.tensors) for u in streamer.units.values())  # bound as the phase started
        assert torch.equal(model(x), expected) and torch.equal(model(x), expected)
    assert len(made) == views  # and not again at the next steps
    ring = streamer.ring
    start, end = ring.data_ptr(), ring.data_ptr() + ring.numel()
    for unit in streamer.units.values():  # between steps every parameter points into the ring
        assert all(start <= t.data_ptr() < end for t in unit.tensors)
    released = weakref.ref(ring)
    del ring
    streamer.release()
    gc.collect()
    assert released() is None  # nothing (no view into it either) holds the ring
    for unit in streamer.units.values():
        assert all(t.data_ptr() == h.data_ptr() for t, h in zip(unit.tensors, unit.home))
    assert torch.equal(model(x), expected)  # a new ring for the next phase
    assert len(copies.entries("buffer")) == 2


def test_an_error_mid_forward_leaves_every_unit_home_after_offload_all_and_the_next_forward_is_right():
    model, names, x, expected, copies, streamer = _streamed(keep=True)
    model(x)

    def stop(module, args):
        raise RuntimeError("out of memory")

    handle = model.streamed[3][1].register_forward_pre_hook(stop)  # inside a unit
    with pytest.raises(RuntimeError):
        model(x)
    handle.remove()
    assert set(streamer.units_on_device()) == set(names)  # bound for the phase
    copies.log.clear()
    assert streamer.offload_all() == len(names)
    assert [e[0] for e in copies.log] == ["wait"] * len(copies.log)  # unused copies waited for, not dropped
    assert streamer.units_on_device() == () and streamer.ring is None and not streamer.pending_copies
    for unit in streamer.units.values():
        assert all(t.data_ptr() == h.data_ptr() for t, h in zip(unit.tensors, unit.home))
    assert torch.equal(model(x), expected) and torch.equal(model(x), expected)


def test_a_forward_stopped_half_way_without_offload_all_restarts_the_ring_s_copies():
    """Copies issued for units a stopped forward never ran must not be taken for the next forward's."""
    model, names, x, expected, copies, streamer = _streamed(keep=True)
    model(x)

    def stop(module, args):
        raise RuntimeError("stopped")

    handle = model.resident[3].register_forward_pre_hook(stop)
    with pytest.raises(RuntimeError):
        model(x)
    handle.remove()
    copies.log.clear()
    assert torch.equal(model(x), expected) and torch.equal(model(x), expected)
    _check_ring([("buffer", 0)] + copies.log, streamer)
    assert len(copies.entries("buffer")) == 0  # the same ring


def test_a_unit_out_of_its_recorded_order_copies_blocking_with_a_warning(caplog):
    model, names, x, expected, copies, streamer = _streamed(keep=True)
    model(x)
    with caplog.at_level("WARNING"):
        extra = model.streamed[2](torch.ones(1, 8))  # run alone, between two forwards
    assert torch.equal(extra, interleaved().streamed[2](torch.ones(1, 8)))
    assert "ran out of its recorded order" in caplog.text
    assert copies.log[-2:] == [("own copy", streamer.units[names[2]].region.numel()), ("run", names[2])]
    assert streamer.units[names[2]].where == "ring"  # back on its views of the ring for the rest of the phase
    assert torch.equal(model(x), expected) and torch.equal(model(x), expected)


def test_a_unit_that_runs_twice_keeps_blocking_copies(caplog):
    model = calls_a_twice()
    x = torch.ones(1, 4)
    expected = model(x)
    copies = SimulatedCopyStreams()
    streamer = stream_units(model, ["a", "b"], torch.device("cpu"), copies, stream=copies.copy_stream())
    with caplog.at_level("WARNING"):
        assert torch.equal(model(x), expected)
    assert not streamer.chained and "twice: ['a']" in caplog.text
    copies.log.clear()
    assert torch.equal(model(x), expected)
    assert [e[0] for e in copies.log] == ["own copy"] * 3  # no ring, no prefetch: each call copies for itself


def _ring_log(log, streamer) -> list:
    """The entries of a shared log that concern ``streamer``'s ring: its buffers (by size), copies, waits and
    units' runs, and every mark."""
    regions = set()  # the host address of each piece of each unit
    for position, name in enumerate(streamer.order):
        at = streamer.units[name].region.data_ptr()
        for _, size in streamer.layout.pieces(position):
            regions.add(at)
            at += size
    arrived = {id(event) for event in streamer._arrived}
    keep = []
    for event in log:
        if (event[0] == "buffer" and event[1] == streamer.ring_bytes) or event[0] == "mark" \
                or (event[0] == "copy" and event[2] in regions) or (event[0] == "wait" and id(event[1]) in arrived) \
                or (event[0] == "run" and event[1] in streamer.units):
            keep.append(event)
    return keep


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_a_planned_pipeline_streams_through_its_rings_and_gives_the_unplanned_images(kind, request, monkeypatch):
    """Each tiny pipeline with a plan that streams part of its denoiser (and its offloaded text encoders) on the fake
    device's copy streams: two images identical to the unplanned pipeline's, the denoiser's ring allocated once an
    image and every unit computing from its own bytes, waited for."""
    import numpy as np
    from diffusers import DiffusionPipeline

    from fakes import generate_64 as run, tiny_dit_stream_budget, tiny_stream_budget
    from mlnb.planner import CardFacts, Workload, apply_plan, model_facts, plan_for_budget, streamer_of
    from mlnb.testing import FakeDevice

    folder = request.getfixturevalue(f"tiny_{kind}")
    reference = run(DiffusionPipeline.from_pretrained(folder))
    pipe = DiffusionPipeline.from_pretrained(folder)
    unet = kind in ("sd", "sdxl")
    budget = tiny_stream_budget(pipe, monkeypatch) if unet else tiny_dit_stream_budget(pipe, monkeypatch, 20_000)
    plan = plan_for_budget(budget, model_facts(pipe), CardFacts(), Workload(64, 64, 1, 2))
    assert plan.strategy == "stream" and len(plan.streamed) >= 2
    device = FakeDevice(cuda_like=True)
    copies = device.streams()
    log_runs(pipe.unet if unet else pipe.transformer, plan.streamed, copies.log)  # under the hooks
    apply_plan(pipe, plan, "cpu", use_stream=True, ctx_device=device)
    streamer = streamer_of(pipe)
    assert np.array_equal(run(pipe), reference)  # records the orders (the denoiser's from its first step on)
    copies.log.clear()
    assert np.array_equal(run(pipe), reference)
    assert streamer.chained and streamer.stream is not None
    ring_log = _ring_log(copies.log, streamer)
    assert [e for e in ring_log if e[0] == "buffer"] == [("buffer", streamer.ring_bytes)]  # once for the image
    assert any(e[0] == "copy" and e[3] is not None for e in ring_log)  # copies waiting for compute, not all of it
    _check_ring(ring_log, streamer)
    assert streamer.ring is None and streamer.units_on_device() == ()  # released at the decode
