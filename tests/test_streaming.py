"""Streaming through a pipeline: the hooks diffusers sees, generations interrupted and planned, the VAE moved whole,
and the planner's replay of a step against the streamer on a virtual clock (the ring itself: ``test_ring.py``)."""

from __future__ import annotations

import pytest
import torch

from fakes import in_runs, interleaved
from mlnb.device import CopyStreams, CpuDevice
from mlnb.planner import stream_units, streamer_of
from mlnb.planner.blocks import unit_block
from mlnb.testing import FakeDevice


@pytest.fixture
def model():
    return interleaved()


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

    def counting(self, stream, dst, src, **kwargs):
        copies.append(src.data_ptr())
        return original(self, stream, dst, src, **kwargs)

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


class _Mark:
    """An event of :class:`Timed`: the virtual time of its latest record."""

    time = 0.0


class Timed(CpuDevice, CopyStreams):
    """A device with a virtual clock, and its own copy streams: the compute stream advances by each layer's given
    seconds, one copy engine moves ``bandwidth`` bytes a second, a copy starts once the engine is free and the compute
    it waits for (the mark ``after``, or all queued before it) is done, and a wait holds the compute until the copy is
    in. Events are reused as on CUDA: a wait or a copy reads an event's latest record."""

    def __init__(self, bandwidth: float) -> None:
        super().__init__()
        self.bandwidth, self.clock, self.engine = bandwidth, 0.0, 0.0

    def new_event(self):
        return _Mark()

    def mark_done(self, event) -> None:
        event.time = self.clock

    def issue_copy(self, stream, dst, src, after=None, done=None):
        super().issue_copy(stream, dst, src)
        seconds = src.numel() * src.element_size() / self.bandwidth
        if stream is None:  # in order on the compute stream
            self.clock += seconds
            return None
        self.engine = max(self.engine, self.clock if after is None else after.time) + seconds
        done = done or _Mark()
        done.time = self.engine
        return done

    def wait_copy(self, handle) -> None:
        if handle is not None:
            self.clock = max(self.clock, handle.time)

    def timing_mark(self):
        return self.clock

    def streams(self) -> CopyStreams:
        return self


def _timed(count: int, slots: int, run: int | None = None, group_share: float | None = None,
           sizes=(8, 16, 32, 8, 16, 32, 8, 8), split: bool = False):
    """``count`` streamed units and a resident layer after each (or after each ``run`` of them, :func:`fakes.in_runs`),
    every layer computing for a set virtual time, the units streamed through a kept ring of ``slots`` of the largest
    on a :class:`Timed` device: the model, device, compute seconds by layer in running order, and streamer."""
    sizes = list(sizes or (8, 16, 32, 8, 16, 32, 8, 8))[:count]
    model = interleaved(sizes=sizes) if run is None else in_runs(sizes=sizes, run=run)
    device = Timed(bandwidth=3e5)  # bytes a second: copies of about 3 to 10 ms, a step's compute 4 to 7 ms
    compute = {}
    for i in range(count):
        compute[f"streamed.{i}"] = 0.0004 * (i % 3 + 1)
        if run is None:
            compute[f"resident.{i}"] = 0.0015 if i % 2 else 0.0002
        elif i % run == run - 1 or i == count - 1:
            compute[f"resident.{i // run}"] = 0.0015 if i % 2 else 0.0002
    modules = dict(model.named_modules())
    for name, seconds in compute.items():
        def forward(*args, _forward=modules[name].forward, _seconds=seconds, **kwargs):
            device.clock += _seconds  # inside the streaming hook: after the wait, before the next copy is issued
            return _forward(*args, **kwargs)

        modules[name].forward = forward
    names = [f"streamed.{i}" for i in range(count)]
    shared = {} if group_share is None else {"group_share": group_share}
    streamer = stream_units(model, names, torch.device("cpu"), device.streams(), stream=object(), keep_slots=True,
                            slots=slots, split=split, **shared)
    return model, device, compute, streamer


@pytest.mark.parametrize("count, slots, run, share", [
    (6, 2, None, None), (5, 2, None, None), (5, 3, None, None), (6, 3, None, None), (4, 2, None, None),
    (8, 2, 3, 1.0), (8, 3, 3, 0.5), (7, 2, 2, 1.0), (8, 3, 4, 1.0), (8, 2, 3, None),
    (8, 2, 3, "split"), (8, 2, None, "split"),
])
def test_the_planner_s_replay_of_a_step_is_what_the_streamer_does(count, slots, run, share):
    """The streamer run on a device with a virtual clock (each layer computing for a set time, copies at a set
    bandwidth) takes, step after step, the time :func:`mlnb.planner.schedule_step` predicts for the same blocks: the
    planner's model of the copies is the streamer's schedule, wrap from one step into the next included, and so are
    groups of adjacent units (``run`` of them between resident layers) and units split across the ring's end."""
    from mlnb.planner import schedule_step

    split = share == "split"  # sizes where a unit passes the ring's end, in groups of any size
    share = 1.0 if split else share
    model, device, compute, streamer = _timed(count, slots, run, share, (8, 8, 16, 8, 32, 8, 8, 8) if split else None,
                                              split)
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
    for name, seconds in compute.items():  # in running order
        rows.append((name, at, seconds))
        at += seconds
    copies = {n: streamer.units[n].layout.nbytes / device.bandwidth for n in names}
    sizes = {n: streamer.units[n].layout.nbytes for n in names}
    cuts = {n: streamer.units[n].layout.offsets[1:] for n in names}
    shared = {} if share is None else {"group_share": share}
    replayed = schedule_step(at, rows, between, copies, slots, steps=6, sizes=sizes, cuts=cuts, **shared)
    assert replayed == pytest.approx(measured, rel=1e-9)
    assert any(streamer.layout.cuts) == split
    modules = dict(model.named_modules())
    assert {n: unit_block(n, modules[n]).cuts for n in names} == cuts  # the planner's facts: the streamer's packing
    if not split:  # without a split, the copy seconds stand in for the bytes
        assert schedule_step(at, rows, between, copies, slots, steps=6, **shared) == pytest.approx(measured, rel=1e-9)
    assert measured > at + between  # the copies did cost time here: the comparison is not trivially equal


@pytest.mark.parametrize("run", [None, 3])
def test_a_streamed_forward_s_block_timeline_is_its_compute_with_the_waits_taken_out(run):
    """On a card where the model never runs whole, a streamed generation times the blocks instead: each streamed
    block's wait for its copy is marked apart from its compute, so the timeline is the compute alone (what the
    planner replays copies against) and the waits add up to what the step lost to them. A group's first block
    waits for the group's copies; the others have nothing left to wait for."""
    from mlnb.planner import BlockTimer

    model, device, compute, streamer = _timed(6 if run is None else 8, 2, run, None if run is None else 1.0)
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
    assert run is None or len(streamer.layout.groups) < len(streamer.order)


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


@pytest.mark.parametrize("split", [False, True])
def test_a_plan_through_three_slots_gives_the_unplanned_image(tiny_sdxl, clean_cache, tmp_path, monkeypatch, split):
    """The whole path with a third slot: the plan applied with ``slots=3`` (and with its units split at the ring's
    end, or not, as the plan says), the streamer's three kept slots and the chain across steps, through the managed
    pipeline; the image is the one the plan with two slots makes."""
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
    monkeypatch.setattr(search, "plan_for_budget",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), slots=3, split_units=split))
    three = mlnb.load_pipeline(tiny_sdxl, budget=budget, device=FakeDevice(cuda_like=True))
    assert three.plan.slots == 3 and streamer_of(three.pipe).slot_count == 3
    for _ in range(2):  # the first image records the order; the second runs the chain
        assert np.array_equal(np.asarray(three.generate("a fox", **call).images[0]), reference)
    streamer = streamer_of(three.pipe)
    assert streamer.chained and streamer.split == split
    assert any(streamer.layout.cuts) == split  # this plan has a unit that passes the ring's end


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
    from mlnb.planner import CardFacts, Workload, apply_plan, model_facts, plan_for_budget
    from mlnb.planner.packed import PackedUnit

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    budget = tiny_stream_budget(pipe, monkeypatch)
    plan = plan_for_budget(budget, model_facts(pipe, max_block=200_000), CardFacts(), Workload(64, 64, 1, 2))
    assert plan.streamed and plan.offload_encoders_vae
    held_at_vae_copy = []
    copy = PackedUnit.copy_to_own

    def watched(self, *args):
        if self.module is pipe.vae:
            held_at_vae_copy.append(streamer_of(pipe).slots_in_use > 0)
        return copy(self, *args)

    monkeypatch.setattr(PackedUnit, "copy_to_own", watched)
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
