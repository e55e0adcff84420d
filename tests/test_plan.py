"""The budget planner: pure plans from fake model and card facts, and a plan applied for real on CPU."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from mlnb.planner import Block, BudgetError, CardFacts, ModelFacts, Workload, cost, plan_for_budget, predict, search
from mlnb.units import GiB, MiB

FP16 = 2


def sdxl_like() -> ModelFacts:
    """SDXL-base weight bytes in fp16 (2.57 B UNet params in 40 blocks, CLIP-L + bigG, VAE)."""
    unet = 2_567_463_684 * FP16
    sizes = [unet * 0.9 / 40] * 40
    return ModelFacts(
        encoders={"text_encoder": 123_060_480 * FP16, "text_encoder_2": 694_659_840 * FP16},
        vae=83_653_863 * FP16,
        blocks=tuple(Block(f"b{i}", int(s)) for i, s in enumerate(sizes)),
        denoiser_other=int(unet * 0.1),
    )


def sd15_like() -> ModelFacts:
    unet = 859_520_964 * FP16
    return ModelFacts(
        encoders={"text_encoder": 123_060_480 * FP16},
        vae=83_653_863 * FP16,
        blocks=tuple(Block(f"b{i}", int(unet * 0.9 / 30)) for i in range(30)),
        denoiser_other=int(unet * 0.1),
    )


SDXL_WORK = Workload(1024, 1024, 1, 20, vae_fp32=True)
SD_WORK = Workload(512, 512, 1, 20)


def test_whole_model_fits_means_no_offload():
    plan = plan_for_budget(40 * GiB, sdxl_like(), CardFacts(), SDXL_WORK)
    assert plan.strategy == "resident" and not plan.streamed and not plan.fp8 and plan.vae_tile is None
    assert plan.predicted_peak <= 40 * GiB


def test_t4_budget_keeps_sdxl_resident():
    """Under a 15 GiB cap the whole SDXL fits: no needless offload (target 1.0x)."""
    plan = plan_for_budget(15 * GiB, sdxl_like(), CardFacts(bandwidth=20e9, step_seconds=0.07), SDXL_WORK)
    assert plan.strategy == "resident" and not plan.fp8


def test_4gib_budget_streams_only_what_does_not_fit():
    facts = sdxl_like()
    plan = plan_for_budget(4 * GiB, facts, CardFacts(), SDXL_WORK)
    assert plan.strategy == "stream"
    assert plan.resident, "a 4 GiB budget can hold part of the UNet"
    assert plan.predicted_peak <= 4 * GiB * 0.92
    assert plan.streamed_bytes == sum(b.nbytes for b in facts.blocks if b.name in plan.streamed)
    assert plan.vae_tile is not None, "SDXL's fp32 decode at 1024² needs tiles under 4 GiB"
    # More budget keeps more resident and streams less.
    bigger = plan_for_budget(6 * GiB, facts, CardFacts(), SDXL_WORK)
    assert bigger.streamed_bytes < plan.streamed_bytes


def test_fp8_only_when_needed():
    facts = sd15_like()
    roomy = plan_for_budget(2 * GiB, facts, CardFacts(), SD_WORK)
    assert not roomy.fp8
    tight = plan_for_budget(int(0.75 * GiB), facts, CardFacts(), SD_WORK)
    assert tight.predicted_peak <= 0.75 * GiB * 0.92
    loose_floor = min(p.predicted_peak for p in search._candidates(int(0.75 * GiB), facts, CardFacts(), SD_WORK) if not p.fp8)
    assert tight.fp8 == (loose_floor > 0.75 * GiB * 0.92)


def test_budget_below_the_reserve_says_what_would_fit():
    with pytest.raises(BudgetError) as info:
        plan_for_budget(400 * MiB, sdxl_like(), CardFacts(), SDXL_WORK)
    message = str(info.value)
    assert "no placement fits 400.0 MiB" in message and "give at least" in message
    assert "make the image" not in message  # no smaller size fits 400 MiB either (the fixed parts do not shrink)
    assert "\n" not in message


def test_the_budget_a_refusal_asks_for_fits():
    """The smallest budget in the message is rounded up to the decimal it shows: asking for exactly that fits (a
    need of 1.049 GiB said "1.0 GiB", and a 1.0 GiB budget was refused with the same advice)."""
    import re

    from mlnb.units import parse_bytes

    for facts, work in ((sdxl_like(), SDXL_WORK), (sd15_like(), SD_WORK)):
        with pytest.raises(BudgetError) as info:
            plan_for_budget(300 * MiB, facts, CardFacts(), work)
        asked = re.search(r"give at least ([\d.]+ [KMG]iB)", str(info.value)).group(1)
        plan_for_budget(parse_bytes(asked.replace(" ", "")), facts, CardFacts(), work)


def test_format_bytes_rounds_up_when_asked():
    from mlnb.units import format_bytes

    assert format_bytes(int(1.049 * GiB)) == "1.0 GiB" and format_bytes(int(1.049 * GiB), up=True) == "1.1 GiB"
    assert format_bytes(GiB, up=True) == "1.0 GiB" and format_bytes(-1.5 * MiB, up=True) == "-1.5 MiB"


@pytest.mark.parametrize("facts, work", [
    (sdxl_like(), dataclasses.replace(SDXL_WORK, batch=4)),
    (sd15_like(), dataclasses.replace(SD_WORK, batch=4)),
    (sdxl_like(), Workload(2048, 2048)),
], ids=["sdxl-x4", "sd15-x4", "sdxl-2048"])
def test_a_smaller_image_is_suggested_only_when_the_planner_finds_it_fits(facts, work):
    """The size in the message is one the planner itself fits into the budget, the largest such square; it was a
    fixed three quarters of the side, which often did not fit either."""
    suggested = 0
    for mib in range(300, 12000, 100):
        try:
            plan_for_budget(mib * MiB, facts, CardFacts(), work)
        except BudgetError as exc:
            found = re.search(r"make the image (\d+)×\1 or smaller", str(exc))
            if found:
                side = int(found.group(1))
                suggested += 1
                plan_for_budget(mib * MiB, facts, CardFacts(), dataclasses.replace(work, width=side, height=side))
                bigger = dataclasses.replace(work, width=side + 64, height=side + 64)
                with pytest.raises(BudgetError):
                    plan_for_budget(mib * MiB, facts, CardFacts(), bigger)
    assert suggested  # some budgets in the range do get a size


def test_measured_card_ranks_by_predicted_time():
    facts = sdxl_like()
    card = CardFacts(bandwidth=25e9, step_seconds=0.07, decode_seconds=0.3)
    plan = plan_for_budget(4 * GiB, facts, card, SDXL_WORK)
    assert plan.predicted_seconds is not None
    floor = SDXL_WORK.steps * max(card.step_seconds, plan.streamed_bytes / card.bandwidth)
    assert plan.predicted_seconds >= floor
    for other in search._candidates(4 * GiB, facts, card, SDXL_WORK):
        if other.predicted_peak <= 4 * GiB * 0.92 and other.predicted_seconds is not None:
            assert plan.predicted_seconds <= other.predicted_seconds


@pytest.mark.parametrize("host", [None, 0.01, 0.5])
def test_streamed_step_time_without_a_timeline_is_compute_plus_copies_or_the_host_s_time(host):
    """Without a block timeline, copies add to compute (an upper bound); the host's time to issue a step, measured,
    sets the step where it is longer. Plus the encoders' and the VAE's one move per image, and the decode scaled by
    the pixels its tiles cover."""
    sdxl = sdxl_like()
    plan = plan_for_budget(4 * GiB, sdxl, CardFacts(bandwidth=20e9, step_seconds=0.2, decode_seconds=0.3), SDXL_WORK)
    assert plan.strategy == "stream" and plan.streamed_bytes and not plan.fp8
    copies = plan.streamed_bytes / 20e9
    assert 0.001 < copies < 0.2
    decode = 0.3 if plan.vae_tile is None else (
        0.3 * cost._tiled_pixels(SDXL_WORK, plan.vae_tile) / 1024**2 * cost.TILE_TIME_FACTOR)
    for compute in (0.2, 0.001):  # compute-bound, then copy-bound
        card = CardFacts(bandwidth=20e9, step_seconds=compute, decode_seconds=0.3, host_forward_seconds=host,
                         host_unit_seconds=0.001)
        step = max(compute + copies, (host or 0) + len(plan.streamed) * 0.001 if host else 0)
        # the encoders and the VAE moved once, and the kept blocks that left for the decode copied back
        once = (plan.transfer_once_bytes + plan.decode_offload_bytes) / 20e9
        expected = SDXL_WORK.steps * step + once + decode
        assert predict(plan, sdxl, card, SDXL_WORK)[1] == pytest.approx(expected)


def test_measured_tiled_decode_and_the_rest_replace_what_the_pixels_and_the_bandwidth_say():
    sdxl = sdxl_like()
    base = CardFacts(bandwidth=20e9, step_seconds=0.1, decode_seconds=0.2)
    plan = plan_for_budget(4 * GiB, sdxl, base, SDXL_WORK)
    assert plan.vae_tile in cost.TILES and plan.transfer_once_bytes
    share = cost._tiled_pixels(SDXL_WORK, plan.vae_tile) / 1024**2 * cost.TILE_TIME_FACTOR
    assert base.decode(SDXL_WORK, plan.vae_tile) == pytest.approx(0.2 * share)
    assert base.decode(SDXL_WORK, None) == 0.2
    compute = 0.1 * (cost.FP8_STEP_FACTOR if plan.fp8 else 1.0)
    # the steps, and the kept blocks that left for the decode copied back
    steps = SDXL_WORK.steps * (compute + plan.streamed_bytes / 20e9) + plan.decode_offload_bytes / 20e9
    assert predict(plan, sdxl, base, SDXL_WORK)[1] == pytest.approx(steps + 0.2 * share + plan.transfer_once_bytes / 20e9)
    measured = dataclasses.replace(base, other_offload_seconds=0.25, other_seconds=9.0,
                                   **{f"decode_seconds_{plan.vae_tile}": 0.7})
    assert measured.decode(SDXL_WORK, plan.vae_tile) == 0.7
    assert predict(plan, sdxl, measured, SDXL_WORK)[1] == pytest.approx(steps + 0.7 + 0.25)  # not the resident 9 s
    # measured only with everything resident (the bench's baseline): that, and the encoders and VAE copied in
    resident_only = dataclasses.replace(measured, other_offload_seconds=None, other_seconds=0.1)
    assert predict(plan, sdxl, resident_only, SDXL_WORK)[1] == pytest.approx(
        steps + 0.7 + 0.1 + plan.transfer_once_bytes / 20e9)


def test_tiles_cover_more_pixels_than_the_image():
    work = Workload(1024, 1024)
    assert cost._tiled_pixels(work, None) == cost._tiled_pixels(work, 1024) == 1024 * 1024
    assert cost._tiled_pixels(work, 512) == 1280 * 1280  # tiles at 0, 384, 768 a side: 512 + 512 + 256 px
    assert cost._tiled_pixels(work, 256) == 1344 * 1344  # 6 a side, every 192 px: 5 × 256 + 64
    assert cost._tiled_pixels(Workload(512, 512), 256) == 640 * 640  # 256 + 256 + 128 a side
    assert cost._tiled_pixels(Workload(1024, 768), 512) == 1280 * 896  # 512 + 384 down the 768 px side


def test_tiled_pixels_are_what_diffusers_decodes(tiny_sd):
    """Counted from the tiles a real ``AutoencoderKL.tiled_decode`` decodes (their latent sizes, times the VAE's
    scale), at sizes where the last tile is cut short and where it is not."""
    import torch

    from mlnb.optimizer.vae import set_vae_tiles
    from mlnb.pipeline.files import load_diffusers_pipeline

    vae = load_diffusers_pipeline(tiny_sd).vae
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    set_vae_tiles(vae, 32)
    decoded = []
    original = vae.decoder.forward
    vae.decoder.forward = lambda z, *a, **k: decoded.append(z.shape[-2] * z.shape[-1] * scale**2) or original(z, *a, **k)
    for width, height in [(64, 64), (96, 80), (56, 64)]:
        decoded.clear()
        with torch.no_grad():
            vae.decode(torch.zeros(1, vae.config.latent_channels, height // scale, width // scale))
        assert sum(decoded) == cost._tiled_pixels(Workload(width, height), 32), (width, height)


def test_overlap_measured():
    assert cost.overlap_measured(0.07, 0.05, 0.12) == pytest.approx(0.0)  # added up
    assert cost.overlap_measured(0.07, 0.05, 0.07) == pytest.approx(1.0)  # the floor
    assert cost.overlap_measured(0.07, 0.05, 0.095) == pytest.approx(0.5)
    assert cost.overlap_measured(0.07, 0.05, 0.2) == 0.0 and cost.overlap_measured(0.07, 0.0, 0.07) == 0.0


def test_streamed_blocks_of_one_size_are_spread_over_the_execution_order():
    """Twenty equal blocks, room for half of them: every other one streams, so each copy has compute beside it."""
    facts = ModelFacts(encoders={"te": 100 * MiB}, vae=100 * MiB,
                       blocks=tuple(Block(f"b{i}", 100 * MiB) for i in range(20)), denoiser_other=50 * MiB)
    work = Workload(512, 512, 1, 30)
    plans = [plan_for_budget(mib * MiB, facts, CardFacts(), work) for mib in range(1500, 2500, 25)]
    plan = next(p for p in plans if len(p.resident) == 10)
    assert plan.strategy == "stream" and len(plan.streamed) == 10
    streamed = sorted(int(n[1:]) for n in plan.streamed)
    assert all(b - a == 2 for a, b in zip(streamed, streamed[1:])), streamed


@pytest.mark.parametrize("budget_gib", [3, 4, 8, 15])
def test_predict_repeats_the_plan_and_follows_the_workload(budget_gib):
    card = CardFacts(bandwidth=20e9, step_seconds=0.07, decode_seconds=0.3)
    work = Workload(1024, 1024, 1, 30)
    sdxl = sdxl_like()
    plan = plan_for_budget(budget_gib * GiB, sdxl, card, work)
    assert predict(plan, sdxl, card, work) == (plan.predicted_peak, pytest.approx(plan.predicted_seconds))
    peak8, seconds8 = predict(plan, sdxl, card, Workload(1024, 1024, 1, 8))
    assert peak8 == plan.predicted_peak and seconds8 < plan.predicted_seconds  # fewer steps, same memory
    bigger, _ = predict(plan, sdxl, card, Workload(1024, 1024, 2, 30))
    assert bigger > plan.predicted_peak  # a batch of two needs more activations
    streamed = plan.streamed_bytes * 30 / card.bandwidth
    if plan.streamed:  # bandwidth-bound steps: the time is the bytes moved
        assert plan.predicted_seconds >= streamed


def test_measured_reserves_replace_the_anchors():
    """A card that measured this model's activations plans with them: a smaller measured need fits more resident."""
    sd15, work = sd15_like(), Workload(512, 512, 1, 30)
    anchors = plan_for_budget(2 * GiB, sd15, CardFacts(), work)  # 0.5 GiB denoise reserve at 512²
    measured = CardFacts(denoise_reserve=300 * MiB, decode_reserve=int(0.3 * GiB))
    tighter = plan_for_budget(2 * GiB, sd15, measured, work)
    assert anchors.strategy == tighter.strategy == "stream"
    assert tighter.streamed_bytes < anchors.streamed_bytes
    assert predict(tighter, sd15, measured, work)[0] == tighter.predicted_peak
    # Tiles take their share of the measured untiled decode.
    sdxl_work = Workload(1024, 1024, 1, 30, vae_fp32=True)
    sdxl_measured = CardFacts(denoise_reserve=300 * MiB, decode_reserve=int(4.95 * GiB))
    tiled = int(4.95 * GiB) // 4 + cost.TILE_OVERHEAD  # a part of the decode does not shrink with the tile
    assert cost.reserves(sdxl_work, 512, sdxl_measured) == (300 * MiB, tiled)
    assert cost.reserves(sdxl_work, 512, sdxl_measured)[1] < cost.reserves(sdxl_work, None, sdxl_measured)[1]
    assert cost.reserves(work, None, CardFacts()) == (cost.denoise_reserve(work), cost.decode_reserve(work, None))


def test_reserves_scale_with_pixels_and_dtype():
    small, big = Workload(512, 512), Workload(1024, 1024)
    assert cost.denoise_reserve(big) > cost.denoise_reserve(small)
    assert cost.decode_reserve(Workload(1024, 1024, vae_fp32=True), None) == 2 * cost.decode_reserve(big, None)
    assert cost.decode_reserve(big, 512) < cost.decode_reserve(big, None)


def test_the_kept_part_moves_to_the_gpu_a_part_at_a_time_around_the_streamed_blocks(monkeypatch):
    """Parts of at most ``MOVE_PART`` bytes, each followed by ``each_part`` (where the host gives back the file
    pages the part was read from), so the host never holds the pages of the whole kept part at once; the streamed
    block stays where it is. The meta device stands in for the GPU."""
    from mlnb.planner import apply

    monkeypatch.setattr(apply, "MOVE_PART", 300_000)
    root = torch.nn.Module()
    root.blocks = torch.nn.ModuleList([torch.nn.Linear(256, 256) for _ in range(4)])  # 263 KB each
    root.head = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    root.big = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))  # 526 KB: split
    on_meta, sizes = [], []

    def each_part(nbytes):
        sizes.append(nbytes)
        on_meta.append(sum(p.is_meta for p in root.parameters()))

    apply._move_except(root, "", {"blocks.2"}, "meta", each_part=each_part)
    assert [p.device.type for p in root.blocks[2].parameters()] == ["cpu", "cpu"]
    assert all(p.is_meta for name, p in root.named_parameters() if not name.startswith("blocks.2."))
    # 3 kept blocks, the head, and the big module's two halves, one at a time, each with its bytes
    assert on_meta == [2, 4, 6, 10, 12, 14] and max(sizes) == 4 * (256 * 256 + 256) and sum(sizes) == 5 * 263168 + 2 * 288
    whole = torch.nn.Sequential(torch.nn.Linear(8, 8))
    apply._move_except(whole, "", set(), "meta")  # without each_part: one move, as before
    assert all(p.is_meta for p in whole.parameters())


def test_the_pages_go_back_once_enough_has_moved(monkeypatch):
    from mlnb.planner import host_memory

    calls = []
    monkeypatch.setattr(host_memory, "release_mapped_weights", lambda: calls.append(1))
    give_back = host_memory.GiveBackEvery(step=100)
    for nbytes in (30, 30, 30, 30, 250, 10):
        give_back(nbytes)
    assert len(calls) == 2  # at 120 bytes moved, then at 260 more


def test_plan_applied_on_cpu_gives_the_same_image(tiny_sdxl, monkeypatch):
    """Streamed blocks, streamed encoders, the VAE's hook and resident parts compute the same image."""
    from diffusers import DiffusionPipeline

    from fakes import generate_64 as run, tiny_stream_budget
    from mlnb.planner import apply_plan, model_facts, streamer_of, streamers_of

    reference = run(DiffusionPipeline.from_pretrained(tiny_sdxl))
    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl)
    budget = tiny_stream_budget(pipe, monkeypatch)
    plan = plan_for_budget(budget, model_facts(pipe, max_block=200_000), CardFacts(), Workload(64, 64, 1, 2))
    assert plan.strategy == "stream" and plan.streamed and plan.resident
    report = apply_plan(pipe, plan, "cpu", use_stream=False)
    assert report.is_applied("group_offload") and report.is_applied("model_cpu_offload")
    assert np.array_equal(run(pipe), reference)
    assert streamer_of(pipe).chained  # the second step, and this second image, ran with the prefetch chain
    assert streamer_of(pipe).slots_in_use == 0  # the denoiser's kept slots were dropped when the VAE decoded
    assert len(streamers_of(pipe)) == 3  # the UNet and both text encoders, streamed unit by unit
    assert np.array_equal(run(pipe), reference)


@pytest.mark.parametrize("max_block", [2_000, 50_000, 200_000])
def test_every_streamable_block_is_called_by_its_forward(tiny_sdxl, max_block):
    """Group offloading onloads a block when the block's forward is called. A unit that is never called (a
    ModuleList, or attention's ``to_out`` list, indexed by its owner) would keep its weights on the CPU: on a GPU that
    failed as "Input type (torch.cuda.HalfTensor) and weight type (torch.HalfTensor)". Every unit must run."""
    from diffusers import DiffusionPipeline

    from mlnb.planner.blocks import denoiser_units, model_facts

    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl)
    units = dict(denoiser_units(pipe.unet, max_block))
    assert [b.name for b in model_facts(pipe, max_block=max_block).blocks] == list(units)
    assert not [n for n, m in units.items() if isinstance(m, torch.nn.ModuleList)]
    called: set[str] = set()
    for name, module in units.items():
        module.register_forward_pre_hook(lambda mod, args, name=name: called.add(name))
    pipe("a fox", num_inference_steps=1, width=64, height=64, generator=torch.Generator().manual_seed(0))
    assert set(units) - called == set()
    if max_block == 2_000:  # small enough that ModuleList items (resnets.0, to_out.0 ...) become units
        assert any(".to_out.0" in n for n in units) and any(n.endswith("resnets.0") or ".resnets.0." in n for n in units)


def test_load_pipeline_with_a_budget(tiny_sd, clean_cache):
    """On a (fake) GPU the plan is applied and its prediction reported; without one it is only shown (tested where
    the user types it, in test_magics)."""
    import mlnb
    from mlnb.testing import FakeDevice

    fake = FakeDevice()
    managed = mlnb.load_pipeline(tiny_sd, budget="3GiB", device=fake)
    assert managed.plan is not None and managed.tag == "budget 3 GiB"
    result = managed.generate("a fox", steps=2, width=64, height=64, seed=1)
    assert result.plan is managed.plan and result.plan_line().startswith("plan for 3 GiB: ")
    # The prediction is for the size generated (64², not the native size the plan was made for).
    assert result.predicted_peak == managed.predict(Workload(64, 64, 1, 2))[0] is not None
    assert f"predicted {result.predicted_peak / 2**30:.1f} GiB" in result.report_line()
    assert result.predicted_seconds is None  # no step time measured on this card
    assert result.step_seconds is not None and result.decode_seconds is not None
    assert mlnb.load_pipeline(tiny_sd, budget=3 * 2**30, device=fake) is managed
    with pytest.raises(mlnb.errors.InvalidArgumentError, match="no placement fits"):
        mlnb.load_pipeline(tiny_sd, budget="1MiB")
    with pytest.raises(mlnb.errors.InvalidArgumentError, match="budget: cannot read size"):
        mlnb.load_pipeline(tiny_sd, budget="plenty")


def test_tiny_blocks_stay_resident_so_they_do_not_cut_a_large_one_s_prefetch():
    """A transformer split into its norm, projections and blocks: the norm and the projections stay on the GPU even
    when the budget streams most of the large blocks."""
    blocks = []
    for group in range(4):
        blocks += [Block(f"g{group}.norm", 5 * 1024), Block(f"g{group}.proj_in", 3 * MiB)]
        blocks += [Block(f"g{group}.t{i}", 66 * MiB) for i in range(4)]
        blocks += [Block(f"g{group}.proj_out", 3 * MiB)]
    facts = ModelFacts(encoders={"te": 100 * MiB}, vae=100 * MiB, blocks=tuple(blocks), denoiser_other=50 * MiB)
    plan = plan_for_budget(int(1.5 * GiB), facts, CardFacts(), Workload(512, 512, 1, 30))
    assert plan.strategy == "stream" and len(plan.streamed) >= 8
    assert all(".t" in name for name in plan.streamed)
    assert all(b.nbytes >= search.MIN_STREAMED or b.name in plan.resident for b in blocks)


def test_the_schedule_replay_refuses_fewer_than_two_steps_or_no_slot():
    from mlnb.planner import schedule_step

    blocks = [("a", 0.0, 0.01), ("b", 0.01, 0.01)]
    with pytest.raises(ValueError, match="at least 2 steps .* got steps=1, slots=2"):
        schedule_step(0.02, blocks, 0.001, {"a": 0.005}, slots=2, steps=1)
    with pytest.raises(ValueError, match="got steps=8, slots=0"):
        schedule_step(0.02, blocks, 0.001, {"a": 0.005}, slots=0)


def test_a_streamed_peak_stands_in_for_the_denoise_reserve_only_below_the_anchor():
    from mlnb.planner.cost import denoise_reserve, streamed_denoise_reserve

    work = Workload(1024, 1024, 1, 20)
    anchor = denoise_reserve(work)
    kept, slots = 3 * GiB, 2 * 66 * MiB
    assert streamed_denoise_reserve(kept + slots + 328 * MiB, kept, slots, work) == 328 * MiB
    assert streamed_denoise_reserve(kept + slots + anchor + MiB, kept, slots, work) is None  # says nothing new
    assert streamed_denoise_reserve(kept + slots, kept, slots, work) is None  # no activations seen: not a figure


def test_an_offloaded_encoder_is_charged_its_streamer_s_slots_not_twice_the_largest_unit_of_any_encoder(tiny_sdxl):
    """Each streamed encoder holds two slots of its own largest unit (one when it streams as a single unit): the
    encode phase is charged the most of those, not twice the largest unit of all the encoders together (SDXL: CLIP-L
    streams as one 235 MiB unit, bigG's two largest units are 242 MiB; 469 MiB was charged)."""
    from diffusers import StableDiffusionXLPipeline

    from mlnb.planner.blocks import model_facts, model_units, text_encoders
    from mlnb.optimizer.weights import module_bytes

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    facts = model_facts(pipe, max_block=200_000)
    per_encoder = []
    for encoder in text_encoders(pipe).values():
        units = [module_bytes(unit) for _, unit in model_units(encoder, 200_000)]
        per_encoder.append(min(2, len(units)) * max(units))
    assert facts.encoder_slots == max(per_encoder)
    encode, _, _ = cost.phase_terms(facts, None, Workload(64, 64, 1, 2), CardFacts())
    assert encode == min(max(facts.encoders.values()), facts.encoder_slots) + cost._ENCODE_ACTIVATIONS
