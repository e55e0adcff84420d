"""Kept denoiser blocks sent to their pinned host copy for the decode: the planner's arithmetic (pure), and the plan
applied on the CPU plan path and through the fake device."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mlnb.planner import Block, CardFacts, ModelFacts, Workload, cost, plan_for_budget, predict, search
from mlnb.planner.cost import usable_bytes
from mlnb.units import GiB, MiB

FP16 = 2
BF16_WORK = Workload(1024, 1024, 1, 20)  # SDXL's VAE decoding in bf16: half the fp32 decode's activations


def sdxl_like() -> ModelFacts:
    """SDXL-base's bytes in fp16; its text encoders move whole, so the encode phase limits what stays resident."""
    unet = 2_567_463_684 * FP16
    return ModelFacts(
        encoders={"text_encoder": 123_060_480 * FP16, "text_encoder_2": 694_659_840 * FP16},
        vae=83_653_863 * FP16,
        blocks=tuple(Block(f"b{i}", int(unet * 0.9 / 40)) for i in range(40)),
        denoiser_other=int(unet * 0.1),
    )


def card(**decodes) -> CardFacts:
    """Run 5's H100 figures, roughly, with the decode times given."""
    return CardFacts(bandwidth=54e9, step_seconds=0.067, denoise_reserve=328 * MiB, decode_reserve=int(2.47 * GiB),
                     other_offload_seconds=0.2, **decodes)


def best(plans, evicting: bool):
    fitting = [p for p in plans if p.predicted_peak <= usable_bytes(4 * GiB, CardFacts()) and not p.fp8
               and bool(p.decode_offload) == evicting]
    return min(fitting, key=lambda p: p.predicted_seconds)


def test_the_planner_sends_kept_blocks_to_the_host_for_an_untiled_decode_when_that_is_faster():
    """Under 4 GiB the untiled bf16 decode (2.5 GiB of activations) does not fit beside the kept part: without
    moving anything the VAE decodes in 512 px tiles (0.4 s measured here). Sending the largest kept blocks to the
    host first costs their copy back (bytes / bandwidth), and the untiled decode takes 0.17 s: the plan does that."""
    facts, slow_tiles = sdxl_like(), card(decode_seconds=0.17, decode_seconds_256=0.55, decode_seconds_512=0.4,
                                          decode_seconds_768=0.35)
    plan = plan_for_budget(4 * GiB, facts, slow_tiles, BF16_WORK)
    assert plan.strategy == "stream" and plan.vae_tile is None and plan.decode_offload
    assert set(plan.decode_offload) <= set(plan.resident)
    sizes = {b.name: b.nbytes for b in facts.blocks}
    assert plan.decode_offload_bytes == sum(sizes[n] for n in plan.decode_offload)
    tiled = best(search._candidates(4 * GiB, facts, slow_tiles, BF16_WORK), evicting=False)
    assert tiled.vae_tile == 512 and tiled.streamed == plan.streamed  # the encoders limit the kept part alike
    back = plan.decode_offload_bytes / 54e9
    assert plan.predicted_seconds == pytest.approx(tiled.predicted_seconds - 0.4 + 0.17 + back)
    assert plan.predicted_seconds < tiled.predicted_seconds
    # As few blocks as the decode needs gone: one fewer and it would not fit.
    kept = facts.denoiser_other + sum(sizes[n] for n in plan.resident)
    _, decode, _ = cost.phase_terms(facts, None, BF16_WORK, slow_tiles)
    usable = usable_bytes(4 * GiB, slow_tiles)
    assert kept - plan.decode_offload_bytes + decode <= usable
    assert kept - plan.decode_offload_bytes + max(sizes.values()) + decode > usable
    assert plan.predicted_peak == kept + max(cost.phase_terms(facts, None, BF16_WORK, slow_tiles)[0],
                                             decode - plan.decode_offload_bytes,
                                             2 * max(sizes[n] for n in plan.streamed) + 328 * MiB)
    assert predict(plan, facts, slow_tiles, BF16_WORK) == (plan.predicted_peak, pytest.approx(plan.predicted_seconds))
    assert f"{len(plan.decode_offload)} kept blocks" in str(plan) and "for the untiled decode" in str(plan)


def test_no_block_leaves_for_the_decode_where_the_tiles_are_as_fast_or_nothing_is_timed():
    facts = sdxl_like()
    fast_tiles = card(decode_seconds=0.17, decode_seconds_256=0.17, decode_seconds_512=0.17, decode_seconds_768=0.17)
    plan = plan_for_budget(4 * GiB, facts, fast_tiles, BF16_WORK)
    assert not plan.decode_offload and plan.vae_tile is not None and plan.decode_offload_bytes == 0
    evicting = best(search._candidates(4 * GiB, facts, fast_tiles, BF16_WORK), evicting=True)
    assert evicting.predicted_seconds > plan.predicted_seconds  # the copy back, for nothing
    unknown = plan_for_budget(4 * GiB, facts, CardFacts(), BF16_WORK)  # no times: the plan that moves least
    assert not unknown.decode_offload and unknown.predicted_seconds is None
    assert "host for the" not in str(plan)


def test_the_decode_phase_holds_the_vae_beside_the_whole_kept_part_and_its_activations_beside_the_rest():
    assert cost.decode_phase(3 * GiB, GiB, 0) == 3 * GiB
    assert cost.decode_phase(3 * GiB, GiB, GiB) == 2 * GiB
    assert cost.decode_phase(3 * GiB, GiB, 5 * GiB) == GiB  # the VAE arrives before the blocks leave


def _evicting(plan, facts, count: int = 2):
    """``plan`` with its ``count`` largest kept blocks sent to the host for the decode."""
    sizes = {b.name: b.nbytes for b in facts.blocks}
    chosen = sorted(plan.resident, key=lambda n: -sizes[n])[:count]
    names = tuple(n for n in plan.resident if n in chosen)
    return dataclasses.replace(plan, decode_offload=names, decode_offload_bytes=sum(sizes[n] for n in names))


def test_kept_blocks_sent_to_the_host_for_the_decode_give_the_same_image_on_the_cpu_plan_path(tiny_sdxl, monkeypatch):
    """On the CPU the "GPU" memory is a buffer of its own: during the decode the blocks' weights are their host
    copies, during the steps the copies brought back, and the images are the same as without the plan."""
    from diffusers import DiffusionPipeline

    from fakes import generate_64 as run, tiny_stream_budget
    from mlnb.planner import apply_plan, model_facts
    from mlnb.planner.decode_room import decode_room_of

    reference = run(DiffusionPipeline.from_pretrained(tiny_sdxl))
    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl)
    budget = tiny_stream_budget(pipe, monkeypatch)
    facts = model_facts(pipe, max_block=200_000)
    plan = _evicting(plan_for_budget(budget, facts, CardFacts(), Workload(64, 64, 1, 2)), facts)
    assert plan.strategy == "stream" and len(plan.decode_offload) == 2
    report = apply_plan(pipe, plan, "cpu", use_stream=False)
    assert "go to their pinned host copy for each decode" in report["model_cpu_offload"].detail
    room = decode_room_of(pipe)
    seen = []

    def at_home(unit) -> bool:
        start = unit.region.data_ptr()
        return all(start <= t.data_ptr() < start + unit.region.numel() for t in unit.tensors)

    def watch(phase):
        def hook(module, args):
            seen.append((phase, room.units_on_device(), [at_home(u) for u in room.held]))
        return hook

    pipe.vae.decoder.register_forward_pre_hook(watch("decode"))
    modules = dict(pipe.unet.named_modules())
    modules[plan.decode_offload[0]].register_forward_pre_hook(watch("step"))
    assert np.array_equal(run(pipe), reference)
    assert np.array_equal(run(pipe), reference)  # the blocks came back for the second image
    assert seen[:3] == [("step", plan.decode_offload, [False, False])] * 2 + [("decode", (), [True, True])]
    assert seen[3:] == seen[:3]
    assert room.units_on_device() == ()  # on the host between images, until the next one starts
    # Without moving them, the same image.
    again = DiffusionPipeline.from_pretrained(tiny_sdxl)
    apply_plan(again, dataclasses.replace(plan, decode_offload=(), decode_offload_bytes=0), "cpu", use_stream=False)
    assert decode_room_of(again) is None and np.array_equal(run(again), reference)


def test_through_the_fake_device_the_kept_blocks_are_on_the_host_while_the_vae_decodes(tiny_sdxl, clean_cache,
                                                                                        monkeypatch, tmp_path):
    """A managed pipeline on a simulated CUDA card whose plan sends two kept blocks to the host for the decode: they
    leave as the VAE decodes, come back as the next image's text encoder starts, and the plan's generations learn
    its untiled decode."""
    from diffusers import DiffusionPipeline

    import mlnb
    from fakes import tiny_stream_budget
    from mlnb.planner import card_facts, model_facts
    from mlnb.planner.decode_room import decode_room_of
    from mlnb.testing import FakeDevice

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    budget = tiny_stream_budget(DiffusionPipeline.from_pretrained(tiny_sdxl), monkeypatch)
    planned = search.plan_for_budget
    monkeypatch.setattr(search, "plan_for_budget", lambda budget, facts, card=None, work=None, host=None: _evicting(
        planned(budget, facts, card, work), facts))
    device = FakeDevice(cuda_like=True)
    managed = mlnb.load_pipeline(tiny_sdxl, budget=budget, device=device)
    assert managed.plan.decode_offload and "kept blocks" in str(managed.plan)
    room = decode_room_of(managed.pipe)
    states = []
    managed.pipe.vae.decoder.register_forward_pre_hook(lambda m, a: states.append(("decode", room.on_device)))
    managed.pipe.text_encoder.register_forward_hook(lambda m, a, o: states.append(("encode", room.on_device)))
    for _ in range(2):
        managed.generate("a fox", steps=2, width=64, height=64, seed=1)
    assert states == [("encode", True), ("decode", False)] * 2
    learnt = card_facts(device, managed.model_key, Workload(64, 64, 1, 2), measure=False)
    assert learnt.decode_seconds is not None and learnt.decode_seconds_256 is None  # untiled, from the plan
    assert model_facts(managed.pipe, max_block=200_000).blocks  # the pipeline is whole and usable


def test_a_plan_with_blocks_out_for_the_decode_learns_its_untiled_decode_and_the_rest_without_their_copy_back(
        tiny_sd, clean_cache, tmp_path, monkeypatch):
    """The copy back is charged apart by the time model, so the time besides the steps and the decode that such a
    plan records leaves it out, and the next prediction adds it once: it is the call's time again."""
    import mlnb
    from mlnb.planner import learning
    from mlnb.planner import StepTimer, card_facts, record_measured
    from mlnb.testing import FakeDevice

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    device = FakeDevice(cuda_like=True)
    managed = mlnb.load_pipeline(tiny_sd, budget="3GiB", device=FakeDevice())
    managed.device = device
    work = Workload(64, 64, 1, 2)
    blocks = managed.plan_facts.blocks
    back_bytes = int(0.03 * device.h2d_bandwidth())  # 30 ms to copy back
    managed.plan = dataclasses.replace(managed.plan, strategy="offload encoders and VAE", offload_encoders_vae=True,
                                       transfer_once_bytes=10**6, decode_offload=(blocks[0].name,),
                                       decode_offload_bytes=back_bytes)
    record_measured(device, managed.model_key, work, step_seconds=0.05)
    card_facts(device, managed.model_key, work)  # the bandwidth, measured and cached
    ticks = iter([0.0, 0.05, 0.10, 0.16])  # two steps of 50 ms, then an untiled decode of 60 ms
    timer = StepTimer(lambda: None, clock=lambda: next(ticks))
    timer.mark(), timer.mark(), timer.mark()
    timer.finish()
    learning.record(managed.learning_context(), work, timer, None, seconds=0.45)
    facts = card_facts(device, managed.model_key, work, measure=False)
    assert facts.decode_seconds == pytest.approx(0.06) and facts.decode_seconds_256 is None
    assert facts.other_offload_seconds == pytest.approx(0.45 - 0.10 - 0.06 - 0.03)
    assert managed.predict(work)[1] == pytest.approx(0.45, rel=1e-3)
