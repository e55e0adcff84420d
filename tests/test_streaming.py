"""Streaming units through GPU slots: the order recorded, the schedule of copies and waits, results unchanged.

On the CPU every copy is done when it is issued; recording copy streams check the order in which copies, waits and
units happen, which on a GPU is what keeps a copy from overwriting a slot that queued kernels still read.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from fakes import calls_a_twice
from mlnb.device import CopyStreams, CpuDevice
from mlnb.planner import stream_units, streamer_of
from mlnb.testing import FakeDevice


class Recording(CopyStreams):
    """Copy streams that copy as the CPU does, and log ``("copy", destination, source)`` (data pointers) and
    ``("wait", copy)``, so that a test can replay the schedule."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def issue_copy(self, stream, dst, src):
        super().issue_copy(stream, dst, src)
        if stream is None:
            self.log.append(("own copy", src.numel()))
            return None
        handle = ("copy", dst.data_ptr(), src.data_ptr())
        self.log.append(handle)
        return handle

    def wait_copy(self, handle) -> None:
        self.log.append(("wait", handle))


class Interleaved(torch.nn.Module):
    """Six streamed units (``s0`` ... ``s5``, of different sizes) with a resident layer after each."""

    def __init__(self, sizes=(8, 16, 8, 32, 8, 16)) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.streamed = torch.nn.ModuleList(torch.nn.Linear(8, 8) if n == 8 else torch.nn.Sequential(
            torch.nn.Linear(8, n), torch.nn.Linear(n, 8)) for n in sizes)
        self.resident = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in sizes)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        for unit, keep in zip(self.streamed, self.resident):
            x = torch.tanh(keep(unit(x))) * self.scale * 2
        return x


def _watch(model, names, log):
    """Log each unit as its forward runs: inside the streaming hook, which wraps the forward it finds."""
    for name in names:
        module = dict(model.named_modules())[name]

        def forward(*args, _forward=module.forward, _name=name, **kwargs):
            log.append(("run", _name))
            return _forward(*args, **kwargs)

        module.forward = forward


@pytest.fixture
def model():
    return Interleaved()


def _streamed(model, keep_slots: bool = False):
    """The model's six units streamed through recording copy streams, each unit logged as it runs; with an input, the
    unstreamed output for it, the log and the streamer."""
    names = [f"streamed.{i}" for i in range(6)]
    x = torch.randn(3, 8)
    expected = model(x)
    device = Recording()
    _watch(model, names, device.log)
    streamer = stream_units(model, names, torch.device("cpu"), device, stream=object(), keep_slots=keep_slots)
    return names, x, expected, device.log, streamer


def test_units_are_copied_two_ahead_into_alternating_slots_and_waited_for_before_they_run(model):
    names, x, expected, log, streamer = _streamed(model)
    assert torch.equal(model(x), expected)
    assert streamer.chained and streamer.order == names
    assert [e[0] for e in log] == ["own copy", "run"] * 6  # the first forward records the order, copying blocking
    for forward in range(2):
        log.clear()
        assert torch.equal(model(x), expected)  # every unit computed with its own weights
        copies = [e for e in log if e[0] == "copy"]
        regions = [streamer.units[n].region.data_ptr() for n in names]
        assert [c[2] for c in copies] == regions  # each unit copied once, in order
        slots = list(dict.fromkeys(c[1] for c in copies))
        assert [slots.index(c[1]) for c in copies] == [0, 1, 0, 1, 0, 1]  # into two slots, alternating
        for position, name in enumerate(names):
            ran = log.index(("run", name))
            copied = log.index(copies[position])
            assert log.index(("wait", copies[position])) < ran  # the compute waits for the unit's own copy
            if position >= 2:  # a slot is refilled only after the unit two places before has run (and left)
                assert copied > log.index(("run", names[position - 2]))
                assert copied < log.index(("run", names[position - 1]))  # and as early as that: two ahead
        assert streamer.slots_in_use == 0 and not streamer.pending_copies  # released when the forward ends
        assert streamer.units_on_device() == ()


def test_kept_slots_carry_over_to_the_next_forward_with_its_first_two_units_already_on_their_way(model):
    """The denoiser's case: the slots stay from one step to the next, the views into them are made once, and the
    next step's first two copies are issued as each slot's last unit of a step leaves."""
    names, x, expected, log, streamer = _streamed(model, keep_slots=True)
    model(x)  # records the order
    log.clear()
    assert torch.equal(model(x), expected)
    copies = [e for e in log if e[0] == "copy"]
    at = [i for i, e in enumerate(log) if e[0] == "copy"]
    assert len(copies) == 8  # 6, then the next forward's first two
    assert log.index(("run", "streamed.4")) < at[-2] < log.index(("run", "streamed.5")) < at[-1]
    assert copies[-2][2] == streamer.units["streamed.0"].region.data_ptr()
    slots = streamer.slot_regions()
    assert len(slots) == streamer.slots_in_use == 2 and streamer.pending_copies == {0, 1}
    log.clear()
    made = []
    as_strided = torch.Tensor.as_strided

    def counting(self, *args, **kwargs):
        made.append(1)
        return as_strided(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "as_strided", counting)
        assert torch.equal(model(x), expected)
    assert log[0] == ("wait", copies[-2])  # nothing copied before the first unit: it was already on its way
    assert [a is b for a, b in zip(streamer.slot_regions(), slots)] == [True, True]  # the same slots, kept
    assert made == []  # and the units' views into them were made once, in the forward before
    released = [weakref.ref(slot) for slot in slots]
    del slots
    streamer.release()
    gc.collect()
    assert streamer.slots_in_use == 0 and not streamer.pending_copies
    assert [ref() for ref in released] == [None, None]  # nothing (no view into them either) holds the slots
    assert torch.equal(model(x), expected)  # new slots after a release


def _check_slots(log, streamer, names) -> None:
    """Replay a log against the kept slots: a copy goes only into a slot whose last unit has run, and a unit runs only
    from the slot its own copy (waited for) went to, with nothing copied into that slot in between."""
    slots = [slot.data_ptr() for slot in streamer.slot_regions()]
    unit_of = {streamer.units[name].region.data_ptr(): name for name in names}
    held: dict[int, list] = {}  # slot -> [unit, waited, ran]
    for event in log:
        if event[0] == "copy":
            slot = slots.index(event[1])
            assert slot not in held or held[slot][2], f"slot {slot} refilled before {held[slot][0]} ran"
            held[slot] = [unit_of[event[2]], False, False]
        elif event[0] == "wait":
            slot = slots.index(event[1][1])
            assert held[slot][0] == unit_of[event[1][2]]
            held[slot][1] = True
        elif event[0] == "run":
            found = [slot for slot, state in held.items() if state[0] == event[1] and state[1] and not state[2]]
            assert found, f"{event[1]} ran without its copy waited for in a slot"
            held[found[0]][2] = True


@pytest.mark.parametrize("count, slots", [(5, 2), (5, 3), (6, 3), (7, 3), (2, 3)])
def test_any_number_of_units_through_two_or_three_kept_slots_never_overwrites_a_slot_in_use(count, slots):
    """The next forward's first units are copied as their slots' last units leave: with a unit count that is not a
    multiple of the slots, the slot a unit is copied into is not the one the unit before it used. On the CPU a copy
    is done when issued, so a wrong slot would also change the output."""
    model = Interleaved(sizes=[8, 16, 32, 8, 16, 8, 32][:count])
    names = [f"streamed.{i}" for i in range(count)]
    x = torch.randn(3, 8)
    expected = model(x)
    device = Recording()
    _watch(model, names, device.log)
    streamer = stream_units(model, names, torch.device("cpu"), device, stream=object(), keep_slots=True, slots=slots)
    model(x)  # records the order
    device.log.clear()
    for _ in range(3):
        assert torch.equal(model(x), expected)
    assert streamer.slots_in_use == min(slots, count) and streamer.pending_copies == set(range(min(slots, count)))
    _check_slots(device.log, streamer, names)
    runs = [i for i, e in enumerate(device.log) if e[0] == "run"]
    copies = [i for i, e in enumerate(device.log) if e[0] == "copy"]
    first = min(slots, count)  # issued as the first chained forward starts
    assert len(copies) == first + 3 * count  # then one a unit: the chain wraps from one forward into the next
    assert copies[first - 1] < runs[0]
    for k in range(first, len(copies)):  # the k-th unit's copy, issued as the unit `slots` places before it leaves
        assert runs[k - first] < copies[k]
        if k - first + 1 < len(runs):
            assert copies[k] < runs[k - first + 1]
    with pytest.raises(ValueError, match="two slots"):
        stream_units(Interleaved(), ["streamed.0"], torch.device("cpu"), device, slots=1)


def test_kept_slots_survive_a_forward_stopped_half_way(model):
    """Copies issued for units a stopped forward never ran must not be taken for the next forward's: the slot they
    went to has been refilled since."""
    names = [f"streamed.{i}" for i in range(6)]
    x = torch.randn(3, 8)
    expected = model(x)
    stream_units(model, names, torch.device("cpu"), Recording(), stream=object(), keep_slots=True)
    model(x), model(x)

    def stop(module, args):
        raise RuntimeError("stopped")

    handle = model.resident[3].register_forward_pre_hook(stop)
    with pytest.raises(RuntimeError):
        model(x)
    handle.remove()
    assert torch.equal(model(x), expected) and torch.equal(model(x), expected)


def test_a_slot_holds_the_largest_unit_and_units_point_into_it_only_while_they_run(model):
    names = [f"streamed.{i}" for i in range(6)]
    streamer = stream_units(model, names, torch.device("cpu"), CopyStreams())
    assert streamer.slot_bytes == max(u.layout.nbytes for u in streamer.units.values())
    model(torch.randn(1, 8))
    seen: dict[int, list[int]] = {}

    def where(position):
        def check(module, args):  # a layer inside the unit: runs after the unit's own hook pointed it somewhere
            pointer = module.weight.data_ptr()
            regions = streamer.slot_regions()
            seen[position] = [i for i, s in enumerate(regions) if 0 <= pointer - s.data_ptr() < s.numel()]
        return check

    for position in (1, 3, 5):  # the units with layers inside (the others are layers themselves)
        model.streamed[position][1].register_forward_pre_hook(where(position))
    model(torch.randn(1, 8))
    assert seen == {1: [1], 3: [1], 5: [1]}
    for unit in streamer.units.values():  # back on the host after
        assert all(t.data_ptr() == h.data_ptr() for t, h in zip(unit.tensors, unit.home))


def test_a_unit_that_runs_twice_keeps_blocking_copies(caplog):
    model = calls_a_twice()
    x = torch.ones(1, 4)
    expected = model(x)
    device = Recording()
    streamer = stream_units(model, ["a", "b"], torch.device("cpu"), device, stream=object())
    with caplog.at_level("WARNING"):
        assert torch.equal(model(x), expected)
    assert not streamer.chained and "twice: ['a']" in caplog.text
    device.log.clear()
    assert torch.equal(model(x), expected)
    assert [e[0] for e in device.log] == ["own copy"] * 3  # no slots, no prefetch: each call copies for itself


def test_an_interrupted_forward_leaves_nothing_on_the_device_after_offload_all(model):
    names = [f"streamed.{i}" for i in range(6)]
    x = torch.randn(2, 8)
    expected = model(x)
    device = Recording()
    streamer = stream_units(model, names, torch.device("cpu"), device, stream=object())
    model(x)

    def stop(module, args):
        raise KeyboardInterrupt

    handle = model.resident[2].register_forward_pre_hook(stop)
    with pytest.raises(KeyboardInterrupt):
        model(x)
    handle.remove()
    assert streamer.pending_copies  # the copies of the units after the stop were issued and never waited for
    device.log.clear()
    assert streamer.offload_all() == 0  # units leave as their forward ends; a unit interrupted inside is counted
    assert [e[0] for e in device.log] == ["wait"] * len([e for e in device.log])  # unused copies waited, not dropped
    assert streamer.slots_in_use == 0 and not streamer.pending_copies
    assert torch.equal(model(x), expected)


def test_a_unit_stopped_inside_is_sent_home(model):
    names = [f"streamed.{i}" for i in range(6)]
    streamer = stream_units(model, names, torch.device("cpu"), CopyStreams())
    model(torch.randn(1, 8))

    def stop(module, args):
        raise RuntimeError("out of memory")

    inner = model.streamed[3][1]
    handle = inner.register_forward_pre_hook(stop)
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 8))
    handle.remove()
    assert streamer.units_on_device() == ("streamed.3",)
    assert streamer.offload_all() == 1
    assert streamer.units_on_device() == ()


def test_the_pipeline_finds_the_onload_device_and_remove_restores_the_model(tiny_sdxl):
    from diffusers import DiffusionPipeline

    from mlnb.planner.blocks import denoiser_units

    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl)
    names = [n for n, _ in denoiser_units(pipe.unet, 50_000)][1::2]
    streamer = stream_units(pipe.unet, names, torch.device("meta"), CopyStreams())
    assert streamer_of(pipe) is streamer
    assert pipe.unet.device == torch.device("meta")  # diffusers reads the onload device from the hooks
    with pytest.raises(ValueError, match="group offloading"):  # and refuses a second offloading on top
        pipe.enable_model_cpu_offload()
    streamer.remove()
    assert pipe.unet.device == torch.device("cpu")


def test_an_interrupted_streamed_generation_leaves_nothing_behind_and_the_next_one_is_the_same(tiny_sdxl, clean_cache,
                                                                                               tmp_path, monkeypatch):
    """Through the managed pipeline, with a plan that streams part of the UNet and both text encoders: Ctrl-C in the
    middle of the second step raises the one-line interruption, no streamed unit is left pointing at device memory,
    no slot is held, and the next generation gives the image of an uninterrupted one."""
    import numpy as np
    from diffusers import DiffusionPipeline

    import mlnb
    from fakes import tiny_stream_budget
    from mlnb.planner import streamers_of

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))  # a step time an earlier run cached would change the plan
    budget = tiny_stream_budget(DiffusionPipeline.from_pretrained(tiny_sdxl), monkeypatch)

    # a plan is applied only on CUDA; this fake computes on the CPU
    managed = mlnb.load_pipeline(tiny_sdxl, budget=budget, device=FakeDevice(cuda_like=True))
    assert managed.plan.strategy == "stream" and managed.plan.streamed
    call = dict(steps=2, width=64, height=64, seed=1)
    reference = np.asarray(managed.generate("a fox", **call).images[0])
    streamers = streamers_of(managed.pipe)
    assert len(streamers) == 3 and all(s.chained for s in streamers)

    resident = dict(managed.pipe.unet.named_modules())[managed.plan.resident[-1]]
    calls = []

    def stop(module, args):
        calls.append(1)
        if len(calls) == 2:  # the second step
            raise KeyboardInterrupt

    handle = resident.register_forward_pre_hook(stop)
    with pytest.raises(mlnb.errors.GenerationInterrupted, match="stays loaded"):
        managed.generate("a fox", **call)
    handle.remove()
    for streamer in streamers:
        assert streamer.units_on_device() == ()
        assert streamer.slots_in_use == 0 and not streamer.pending_copies
    assert np.array_equal(np.asarray(managed.generate("a fox", **call).images[0]), reference)


def test_a_vae_that_is_not_upcast_goes_to_the_gpu_in_one_copy_from_pinned_memory(tiny_sd, monkeypatch):
    """SD1.5's VAE decodes in its stored dtype: it is one packed host region, copied whole when ``decode`` runs
    (diffusers calls the accelerate hook there) and pointed back at the host copy when the next image starts."""
    import numpy as np
    from diffusers import DiffusionPipeline

    from fakes import generate_64 as run, tiny_stream_budget
    from mlnb.planner import CardFacts, Workload, apply_plan, model_facts, plan_for_budget

    reference = run(DiffusionPipeline.from_pretrained(tiny_sd))
    pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    budget = tiny_stream_budget(pipe, monkeypatch)
    plan = plan_for_budget(budget, model_facts(pipe, max_block=200_000), CardFacts(), Workload(64, 64, 1, 2))
    assert plan.strategy == "stream" and plan.offload_encoders_vae
    report = apply_plan(pipe, plan, "cpu", use_stream=False)
    assert "from pinned memory" in report["model_cpu_offload"].detail
    whole = pipe.vae._mlnb_whole
    copies = []
    original = CopyStreams.issue_copy

    def counting(self, stream, dst, src):
        copies.append(src.data_ptr())
        return original(self, stream, dst, src)

    monkeypatch.setattr(CopyStreams, "issue_copy", counting)
    for _ in range(2):
        copies.clear()
        assert np.array_equal(run(pipe), reference)
        assert whole.on_device and copies.count(whole.unit.region.data_ptr()) == 1  # once, at decode
    pipe.text_encoder(torch.zeros(1, 77, dtype=torch.long))  # the next image's first model
    assert not whole.on_device
    assert all(t.data_ptr() == h.data_ptr() for t, h in zip(whole.unit.tensors, whole.unit.home))


def test_a_host_that_cannot_lock_the_memory_streams_from_pageable_memory(model, caplog):
    names = [f"streamed.{i}" for i in range(6)]
    x = torch.randn(2, 8)
    expected = model(x)

    def refuse(nbytes):
        raise RuntimeError("cannot lock host memory")

    with caplog.at_level("WARNING"):
        streamer = stream_units(model, names, torch.device("cpu"), CopyStreams(), host_buffer=refuse)
    assert "could not pin the streamed weights (cannot lock host memory)" in caplog.text
    assert all(unit.region is not None for unit in streamer.units.values())
    assert torch.equal(model(x), expected) and torch.equal(model(x), expected)


class Timed(CpuDevice, CopyStreams):
    """A device with a virtual clock, and its own copy streams: the compute stream advances by each layer's given
    seconds, one copy engine moves ``bandwidth`` bytes a second, a copy starts once the engine is free and the compute
    queued before it is done, and a wait holds the compute until the copy is in."""

    def __init__(self, bandwidth: float) -> None:
        super().__init__()
        self.bandwidth, self.clock, self.engine = bandwidth, 0.0, 0.0

    def issue_copy(self, stream, dst, src):
        super().issue_copy(stream, dst, src)
        seconds = src.numel() * src.element_size() / self.bandwidth
        if stream is None:  # in order on the compute stream
            self.clock += seconds
            return None
        self.engine = max(self.engine, self.clock) + seconds
        return self.engine

    def wait_copy(self, handle) -> None:
        if handle is not None:
            self.clock = max(self.clock, handle)

    def timing_mark(self):
        return self.clock

    def streams(self) -> CopyStreams:
        return self


def _timed(count: int, slots: int):
    """``count`` streamed units and a resident layer after each, every layer computing for a set virtual time, the
    units streamed through ``slots`` kept slots of a :class:`Timed` device: the model, device, compute seconds by
    layer, and streamer."""
    model = Interleaved(sizes=[8, 16, 32, 8, 16, 32][:count])
    device = Timed(bandwidth=1e6)  # bytes a second: copies of about 0.5 to 2 ms
    compute = {}
    for i in range(count):
        compute[f"streamed.{i}"] = 0.0004 * (i % 3 + 1)
        compute[f"resident.{i}"] = 0.0015 if i % 2 else 0.0002
    modules = dict(model.named_modules())
    for name, seconds in compute.items():
        def forward(*args, _forward=modules[name].forward, _seconds=seconds, **kwargs):
            device.clock += _seconds  # inside the streaming hook: after the wait, before the next copy is issued
            return _forward(*args, **kwargs)

        modules[name].forward = forward
    names = [f"streamed.{i}" for i in range(count)]
    streamer = stream_units(model, names, torch.device("cpu"), device.streams(), stream=object(), keep_slots=True,
                            slots=slots)
    return model, device, compute, streamer


@pytest.mark.parametrize("count, slots", [(6, 2), (5, 2), (5, 3), (6, 3)])
def test_the_planner_s_replay_of_a_step_is_what_the_streamer_does(count, slots):
    """The streamer run on a device with a virtual clock (each layer computing for a set time, copies at a set
    bandwidth) takes, step after step, the time :func:`mlnb.planner.schedule_step` predicts for the same blocks: the
    planner's model of the copies is the streamer's schedule, wrap from one step into the next included."""
    from mlnb.planner import schedule_step

    model, device, compute, streamer = _timed(count, slots)
    names = list(streamer.units)
    x, between = torch.randn(2, 8), 0.0003
    model(x)  # records the order
    starts = []
    for _ in range(6):
        starts.append(device.clock)
        model(x)
        device.clock += between  # the scheduler's step
    measured = (device.clock - starts[1]) / 5  # as the replay: the steps after the first
    rows, at = [], 0.0
    for i in range(count):
        for name in (f"streamed.{i}", f"resident.{i}"):
            rows.append((name, at, compute[name]))
            at += compute[name]
    copies = {n: streamer.units[n].layout.nbytes / device.bandwidth for n in names}
    assert schedule_step(at, rows, between, copies, slots, steps=6) == pytest.approx(measured, rel=1e-9)
    assert measured > at + between  # the copies did cost time here: the comparison is not trivially equal


def test_a_streamed_forward_s_block_timeline_is_its_compute_with_the_waits_taken_out():
    """On a card where the model never runs whole, a streamed generation times the blocks instead: each streamed
    block's wait for its copy is marked apart from its compute, so the timeline is the compute alone (what the
    planner replays copies against) and the waits add up to what the step lost to them."""
    from mlnb.planner import BlockTimer

    model, device, compute, streamer = _timed(6, 2)
    x = torch.randn(2, 8)
    model(x)  # records the order
    modules = dict(model.named_modules())
    with BlockTimer(device, model, {name: modules[name] for name in compute}, forward=2, streamer=streamer) as timed:
        for _ in range(3):
            began = device.clock
            model(x)
    took = device.clock - began
    forward, rows = timed.timeline()
    assert [name for name, _, _ in rows] == list(compute)  # streamed.0, resident.0, streamed.1, ...
    assert [seconds for _, _, seconds in rows] == pytest.approx(list(compute.values()))
    starts = [sum(list(compute.values())[:i]) for i in range(len(compute))]
    assert [start for _, start, _ in rows] == pytest.approx(starts)  # back to back: the waits are taken out
    assert forward == pytest.approx(sum(compute.values()))
    assert timed.stall_seconds == pytest.approx(took - forward) and timed.stall_seconds > 0
    assert streamer.on_ready is None  # unhooked after


def test_a_model_that_never_ran_whole_on_the_card_gets_its_time_predicted_from_a_streamed_generation(
        tiny_sdxl, clean_cache, tmp_path, monkeypatch):
    """A 4 GB card never runs SDXL resident, so it never measures a resident step. The first streamed generation
    records its compute instead (the step less its waits for copies, and the block timeline without them), and
    from the second image on the plan's time is predicted."""
    import mlnb
    from diffusers import DiffusionPipeline

    from fakes import tiny_stream_budget
    from mlnb.planner import Workload, card_facts

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    budget = tiny_stream_budget(DiffusionPipeline.from_pretrained(tiny_sdxl), monkeypatch)

    # a plan is applied, and measurements recorded, only on CUDA
    managed = mlnb.load_pipeline(tiny_sdxl, budget=budget, device=FakeDevice(cuda_like=True))
    assert managed.plan.strategy == "stream"
    work = Workload(64, 64, 1, 3)
    assert managed.predict(work)[1] is None  # nothing measured on this card yet
    first = managed.generate("a fox", steps=3, width=64, height=64, seed=1)
    assert first.predicted_seconds is None
    card = card_facts(managed.device, managed.model_key, work, measure=False)
    forward, rows = card.block_timeline
    assert {name for name, _, _ in rows} == {b.name for b in managed.plan_facts.blocks}
    assert 0 < card.step_seconds <= first.step_seconds  # the waits taken out (none to speak of on a CPU)
    second = managed.generate("a fox", steps=3, width=64, height=64, seed=1)
    assert second.predicted_seconds is not None and second.predicted_seconds > 0
    assert card_facts(managed.device, managed.model_key, work, measure=False).unit_overhead >= 0


def test_a_plan_whose_steps_made_the_allocator_free_memory_leaves_it_more_room_next_time(
        tiny_sdxl, clean_cache, tmp_path, monkeypatch, caplog):
    """Under a cap, an allocation the allocator cannot fit makes it free cached memory and retry, which synchronizes
    the device. When that happened during a plan's steps, the card's fragmentation margin for the model grows to
    1.5 times the room the plan left beside the loop's peak, so the next plan leaves more; when it did not, nothing
    changes."""
    import mlnb
    from diffusers import DiffusionPipeline

    from fakes import tiny_stream_budget
    from mlnb.planner import Workload, card_facts

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    budget = tiny_stream_budget(DiffusionPipeline.from_pretrained(tiny_sdxl), monkeypatch)

    class Counting(FakeDevice):
        frees_per_read = 0
        reads = 0

        def allocator_counters(self):
            self.reads += 1
            return {"num_alloc_retries": 0, "num_device_free": self.frees_per_read * self.reads}

        def peak_allocated_bytes(self):
            return budget // 2

    device = Counting(cuda_like=True)
    managed = mlnb.load_pipeline(tiny_sdxl, budget=budget, device=device)
    work = Workload(64, 64, 1, 3)
    managed.generate("a fox", steps=3, width=64, height=64, seed=1)
    assert card_facts(device, managed.model_key, work, measure=False).fragmentation_reserve is None  # no frees
    device.frees_per_read = 2
    with caplog.at_level("WARNING"):
        result = managed.generate("a fox", steps=3, width=64, height=64, seed=1)
    assert result.allocator_in_steps == {"num_alloc_retries": 0, "num_device_free": 2}  # read after steps 1 and 3
    margin = card_facts(device, managed.model_key, work, measure=False).fragmentation_reserve
    assert margin == max(int(1.5 * (budget - budget // 2)), 64 * 2**20)
    assert "freed cached memory 2 time(s) during the steps" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        managed.generate("a fox", steps=3, width=64, height=64, seed=1)  # the same plan again: said once
    assert "freed cached memory" not in caplog.text
    assert card_facts(device, managed.model_key, work, measure=False).fragmentation_reserve == margin


def test_a_plan_through_three_slots_gives_the_unplanned_image(tiny_sdxl, clean_cache, tmp_path, monkeypatch):
    """The whole path with a third slot: the plan applied with ``slots=3``, the streamer's three kept slots and the
    chain across steps, through the managed pipeline; the image is the one the plan with two slots makes."""
    import dataclasses

    import numpy as np
    from diffusers import DiffusionPipeline

    import mlnb
    from fakes import tiny_stream_budget
    from mlnb.planner import search

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))  # nothing measured: the plan streams by size, two slots
    # the managed pipeline loads in fp16 here (a CUDA-like device): the budget is sized from the same weights
    budget = tiny_stream_budget(DiffusionPipeline.from_pretrained(tiny_sdxl, torch_dtype=torch.float16), monkeypatch)

    call = dict(steps=3, width=64, height=64, seed=1)
    two = mlnb.load_pipeline(tiny_sdxl, budget=budget, device=FakeDevice(cuda_like=True))
    assert two.plan.slots == 2 and len(two.plan.streamed) >= 3
    reference = np.asarray(two.generate("a fox", **call).images[0])
    two.unload()
    monkeypatch.setenv("MLNB_CACHE", str(tmp_path / "again"))  # the same plan again, not one timed by the images
    real = search.plan_for_budget
    monkeypatch.setattr(search, "plan_for_budget", lambda *a, **k: dataclasses.replace(real(*a, **k), slots=3))
    three = mlnb.load_pipeline(tiny_sdxl, budget=budget, device=FakeDevice(cuda_like=True))
    assert three.plan.slots == 3 and streamer_of(three.pipe).slot_count == 3
    for _ in range(2):  # the first image records the order; the second runs the chain
        assert np.array_equal(np.asarray(three.generate("a fox", **call).images[0]), reference)
    assert streamer_of(three.pipe).chained


def test_a_planned_sdxl_whose_vae_decodes_in_bf16_moves_it_whole_from_pinned_memory_and_gives_the_unplanned_image(
        tiny_sdxl, clean_cache, tmp_path, monkeypatch):
    """On a card that computes bf16 the SDXL VAE is not upcast, so a plan that offloads it keeps it in one packed host
    region (no accelerate hook) like SD's; the image is the one the same VAE gives on an unplanned pipeline."""
    import numpy as np
    from diffusers import DiffusionPipeline

    import mlnb
    from fakes import tiny_stream_budget

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    budget = tiny_stream_budget(DiffusionPipeline.from_pretrained(tiny_sdxl, torch_dtype=torch.float16), monkeypatch)

    device = FakeDevice(compute_capability=(8, 0), cuda_like=True)
    call = dict(steps=2, width=64, height=64, seed=1)
    plain = mlnb.load_pipeline(tiny_sdxl, level="none", device=device)
    assert plain.pipe.vae.dtype == torch.bfloat16
    reference = np.asarray(plain.generate("a fox", **call).images[0])
    plain.unload()
    planned = mlnb.load_pipeline(tiny_sdxl, budget=budget, device=device)
    assert planned.plan.offload_encoders_vae and planned.pipe.vae.dtype == torch.bfloat16
    assert hasattr(planned.pipe.vae, "_mlnb_whole")  # one pinned region, not accelerate's hook for an upcast VAE
    assert "pinned memory" in planned.techniques["model_cpu_offload"].detail
    for _ in range(2):
        assert np.array_equal(np.asarray(planned.generate("a fox", **call).images[0]), reference)
    assert planned.pipe.vae.dtype == torch.bfloat16


def test_a_planned_sdxl_vae_that_decodes_in_fp32_is_cast_on_the_gpu_from_its_pinned_fp16_copy(
        tiny_sdxl, clean_cache, tmp_path, monkeypatch):
    """On a card without bf16 (a T4, a 4 GB GTX 1650) the fp16 SDXL VAE decodes in fp32. A plan that offloads it
    keeps one pinned fp16 region, copies it whole at the decode and casts it to fp32 there, instead of the pipeline
    casting it on the host before the decode; at rest it points at its fp16 host copy again. The image is the
    unplanned pipeline's, but for the latents' scaling, which the pipeline now does in fp16 before they reach the
    fp32 decoder."""
    import numpy as np
    from diffusers import DiffusionPipeline

    import mlnb
    from fakes import tiny_stream_budget
    from mlnb.optimizer.offload import vae_needs_upcast
    from mlnb.optimizer.vae import vae_decode_dtype

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    budget = tiny_stream_budget(DiffusionPipeline.from_pretrained(tiny_sdxl, torch_dtype=torch.float16), monkeypatch)

    device = FakeDevice(cuda_like=True)  # compute capability 7.5: no bf16
    call = dict(steps=2, width=64, height=64, seed=1)
    plain = mlnb.load_pipeline(tiny_sdxl, level="none", device=device)
    assert plain.pipe.vae.dtype == torch.float16 and vae_decode_dtype(plain.pipe) == "fp32"
    reference = np.asarray(plain.generate("a fox", **call).images[0]).astype(int)
    plain.unload()
    planned = mlnb.load_pipeline(tiny_sdxl, budget=budget, device=device)
    vae = planned.pipe.vae
    assert planned.plan.offload_encoders_vae and hasattr(vae, "_mlnb_whole")
    assert not vae.config.force_upcast and vae_needs_upcast(planned.pipe) and vae_decode_dtype(planned.pipe) == "fp32"
    assert "cast to fp32 on the GPU" in planned.techniques["model_cpu_offload"].detail
    seen = []
    vae.decoder.register_forward_pre_hook(lambda m, args: seen.append((next(m.parameters()).dtype, args[0].dtype)))
    for _ in range(2):
        image = np.asarray(planned.generate("a fox", **call).images[0]).astype(int)
        assert np.abs(image - reference).max() <= 2 and np.abs(image - reference).mean() < 0.5
    assert seen == [(torch.float32, torch.float32)] * 2  # weights and latents in fp32 inside the decoder
    whole = vae._mlnb_whole
    assert whole.on_device and vae.dtype == torch.float32  # until the next image's first model starts
    whole.offload()
    homes = {t.data_ptr() for t in whole.unit.home}
    assert vae.dtype == torch.float16 and {p.data_ptr() for p in vae.parameters()} <= homes  # its fp16 host copy


def test_the_denoiser_s_kept_slots_are_dropped_before_the_vae_is_copied_to_the_gpu(tiny_sdxl, tmp_path, monkeypatch):
    """The planner counts the slots in the denoising loop only: the VAE (moved whole at ``decode``, before its first
    module runs) must not arrive while they are still allocated, or the decode's peak holds both."""
    from diffusers import StableDiffusionXLPipeline

    from fakes import tiny_stream_budget
    from mlnb.planner import CardFacts, Workload, apply_plan, model_facts, plan_for_budget, streaming

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    budget = tiny_stream_budget(pipe, monkeypatch)
    plan = plan_for_budget(budget, model_facts(pipe, max_block=200_000), CardFacts(), Workload(64, 64, 1, 2))
    assert plan.streamed and plan.offload_encoders_vae
    held_at_vae_copy = []
    copy = streaming._Unit.copy_to_own

    def watched(self, *args):
        if self.module is pipe.vae:
            held_at_vae_copy.append(streamer_of(pipe).slots_in_use > 0)
        return copy(self, *args)

    monkeypatch.setattr(streaming._Unit, "copy_to_own", watched)
    apply_plan(pipe, plan, "cpu", use_stream=False)
    pipe.set_progress_bar_config(disable=True)
    for _ in range(2):  # the first image records the order; the second keeps its slots across the steps
        pipe("a fox", num_inference_steps=3, width=64, height=64)
    assert held_at_vae_copy == [False, False]


def test_a_streamed_generation_records_the_loop_s_activations_until_a_resident_run_measures_them(
        tiny_sdxl, clean_cache, tmp_path, monkeypatch):
    """A 4 GB card never runs SDXL resident, so the anchors' reserve (larger than the loop needs) would stay for
    good: the streamed generation's peak, less the kept part and the slots, replaces it."""
    import mlnb
    from diffusers import DiffusionPipeline

    from fakes import tiny_stream_budget
    from mlnb.planner import Workload, card_facts

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    budget = tiny_stream_budget(DiffusionPipeline.from_pretrained(tiny_sdxl), monkeypatch)  # assumes 100 000 bytes

    device = FakeDevice(cuda_like=True)
    managed = mlnb.load_pipeline(tiny_sdxl, budget=budget, device=device)
    activations = 60_000  # what each forward allocates on the (fake) card: below the reserve the planner assumes
    managed.pipe.unet.register_forward_pre_hook(lambda module, args: device.allocate(activations))
    managed.pipe.unet.register_forward_hook(lambda module, args, output: device.release(activations))
    work = Workload(64, 64, 1, 3)
    assert card_facts(device, managed.model_key, work, measure=False).denoise_reserve is None
    managed.generate("a fox", steps=3, width=64, height=64, seed=1)
    streamer = streamer_of(managed.pipe)
    slots = streamer.slot_bytes * min(streamer.slot_count, len(streamer.units))
    assert card_facts(device, managed.model_key, work, measure=False).denoise_reserve == activations - slots
