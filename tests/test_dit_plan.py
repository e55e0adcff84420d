"""Budget plans for transformer denoisers (the tiny SD3 and Flux pipelines of mlnb.tiny.dit, and the real SD3.5 and
FLUX.1 shapes on the meta device): units in the order the forward runs them, the embedders and norms around the
block lists among them, T5 streamed block by block, the image unchanged, and a denoiser the planner does not know
planned as a whole."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from fakes import generate_64 as run, tiny_dit_stream_budget
from mlnb.planner import CardFacts, Workload, apply_plan, model_facts, plan_for_budget, streamer_of, streamers_of
from mlnb.planner.blocks import denoiser_units, model_units, text_encoders
from mlnb.planner.models import EXECUTION_ORDER, execution_order, native_size
from mlnb.planner.search import BudgetError, fit_host
from mlnb.planner.streaming import module_streamer
from mlnb.testing import FakeDevice
from mlnb.units import GiB

KINDS = ("sd3", "flux")
MAX_DIFF, MEAN_DIFF = 12, 2.0  # out of 255, as tests/test_tiny_dit.py allows against level none


def _pipe(request, kind: str):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(request.getfixturevalue(f"tiny_{kind}"))


def _t5(pipe):
    return pipe.text_encoder_3 if type(pipe).__name__ == "StableDiffusion3Pipeline" else pipe.text_encoder_2


def _first_run_order(pipe, units: dict) -> list[str]:
    """The units in the order one denoising step first enters them (forward-pre-hooks), each once."""
    order: list[str] = []
    handles = [module.register_forward_pre_hook(lambda m, a, n=name: order.append(n) if n not in order else None)
               for name, module in units.items()]
    pipe.set_progress_bar_config(disable=True)
    pipe("a fox", num_inference_steps=1, width=64, height=64, generator=torch.Generator().manual_seed(0))
    for handle in handles:
        handle.remove()
    return order


@pytest.mark.parametrize("max_block", [0, 20_000, 200_000])
@pytest.mark.parametrize("kind", KINDS)
def test_units_are_listed_in_the_order_the_forward_runs_them(request, kind, max_block):
    """At every cut (0: every layer its own unit, which checks each entry of the per-class table against a traced
    forward), each unit runs, in the order the planner lists it."""
    pipe = _pipe(request, kind)
    units = dict(denoiser_units(pipe.transformer, max_block))
    assert [b.name for b in model_facts(pipe, max_block=max_block).blocks] == list(units)
    assert not [n for n, m in units.items() if isinstance(m, torch.nn.ModuleList)]
    assert _first_run_order(pipe, units) == list(units)
    # the embedders and norms around the block lists are units, first and last
    first, last = list(units)[0], list(units)[-1]
    assert first.startswith({"sd3": "pos_embed", "flux": "x_embedder"}[kind]) and last == "proj_out"


def test_a_flux_single_stream_block_cut_into_sub_units_streams_its_attention_before_its_output_projection(tiny_flux):
    """The block registers ``proj_out`` before ``attn`` and runs it after: registration order would list the units
    wrongly (and the planner's spread, timeline and replay with them)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_flux)
    block = pipe.transformer.single_transformer_blocks[0]
    registered = [name for name, child in block.named_children() if any(True for _ in child.parameters())]
    assert registered.index("proj_out") < registered.index("attn")
    names = [n for n, _ in denoiser_units(pipe.transformer, 20_000) if n.startswith("single_transformer_blocks.0.")]
    assert names == [f"single_transformer_blocks.0.{n}" for n in ("norm", "proj_mlp", "attn", "proj_out")]
    assert [n for n, _ in execution_order(block)] == ["norm", "proj_mlp", "attn", "proj_out", "act_mlp"]  # unnamed last
    assert [n for n, _ in execution_order(block, scoped=False)] == [n for n, _ in block.named_children()]


def test_the_table_names_children_that_exist():
    """Each ordered name is a child of its class in the tiny models (a renamed child would silently fall back to
    registration order)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    seen: dict[str, set[str]] = {}
    for model in (SD3Transformer2DModel(num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                        caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=16,
                                        sample_size=8, pos_embed_max_size=8, dual_attention_layers=(0,),
                                        qk_norm="rms_norm"),
                  FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                         joint_attention_dim=16, pooled_projection_dim=16, in_channels=16,
                                         guidance_embeds=True, axes_dims_rope=(2, 2, 4))):
        for module in model.modules():
            seen.setdefault(type(module).__name__, set()).update(n for n, _ in module.named_children())
    for cls in [c for c in EXECUTION_ORDER if not c.startswith("T5")]:
        assert cls in seen, cls
        assert set(EXECUTION_ORDER[cls]) & seen[cls], cls


@pytest.mark.parametrize("kind", KINDS)
def test_a_budget_plan_applied_on_the_cpu_gives_the_unplanned_image(request, kind, monkeypatch):
    """Part of the transformer (embedders and sub-units included) streamed through kept slots, the rest resident,
    the text encoders (T5 among them) streamed unit by unit and the VAE moved whole: the image is the unplanned one,
    twice, and every streamer ran with its prefetch chain."""
    reference = run(_pipe(request, kind))
    pipe = _pipe(request, kind)
    budget = tiny_dit_stream_budget(pipe, monkeypatch, 20_000)
    plan = plan_for_budget(budget, model_facts(pipe), CardFacts(), Workload(64, 64, 1, 2))
    assert plan.strategy == "stream" and plan.streamed and plan.resident and not plan.fp8
    report = apply_plan(pipe, plan, "cpu", use_stream=False)
    assert report.is_applied("group_offload") and report.is_applied("model_cpu_offload")
    assert np.array_equal(run(pipe), reference)
    streamer = streamer_of(pipe)
    assert streamer.order == list(plan.streamed)  # listed as they ran: the replay's order is the streamer's
    assert streamer.slots_in_use == 0  # dropped when the VAE decoded
    assert len(streamers_of(pipe)) == 1 + len(text_encoders(pipe))  # the transformer and every text encoder
    assert all(s.chained for s in streamers_of(pipe))
    assert np.array_equal(run(pipe), reference)


@pytest.mark.parametrize("kind", KINDS)
def test_a_streamed_plan_with_fp8_storage_gives_the_unplanned_image_within_tolerance(request, kind, monkeypatch):
    """fp8 storage (diffusers' layerwise casting) under the streamer's hooks: each streamed unit's fp8 bytes go
    through its slot and are upcast for its forward."""
    import dataclasses

    reference = run(_pipe(request, kind)).astype(np.int16)
    pipe = _pipe(request, kind)
    budget = tiny_dit_stream_budget(pipe, monkeypatch, 20_000)
    plan = dataclasses.replace(plan_for_budget(budget, model_facts(pipe), CardFacts(), Workload(64, 64, 1, 2)), fp8=True)
    assert plan.strategy == "stream"
    assert apply_plan(pipe, plan, "cpu", use_stream=False).is_applied("fp8_storage")
    first, second = run(pipe).astype(np.int16), run(pipe).astype(np.int16)
    assert np.array_equal(first, second) and streamer_of(pipe).chained
    diff = np.abs(first - reference)
    assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (diff.max(), diff.mean())


@pytest.mark.parametrize("kind", KINDS)
def test_fp8_streamed_units_compute_from_the_ring_and_hold_no_copy_of_their_own(request, kind, monkeypatch):
    """Layerwise casting sends each layer back to its storage dtype after its forward with ``module.to``, which gives
    the weights new memory: a streamed unit must compute from its bytes in the ring at every step, never keep a copy
    of its own (on a GPU that copy would stay for the rest of the image, beside the ring)."""
    import dataclasses

    pipe = _pipe(request, kind)
    budget = tiny_dit_stream_budget(pipe, monkeypatch, 20_000)
    plan = dataclasses.replace(plan_for_budget(budget, model_facts(pipe), CardFacts(), Workload(64, 64, 1, 2)), fp8=True)
    apply_plan(pipe, plan, "cpu", use_stream=False)
    streamer = streamer_of(pipe)
    modules = dict(pipe.transformer.named_modules())
    outside: list[str] = []

    def after_step(p, step, timestep, kwargs):
        ring = streamer.ring
        if ring is not None and streamer.chained:
            start, end = ring.data_ptr(), ring.data_ptr() + ring.numel()
            homes = {h.untyped_storage().data_ptr() for h in streamer.host_copies()}
            for name in plan.streamed:
                for key, tensor in modules[name].named_parameters():
                    ptr = tensor.data_ptr()
                    if not start <= ptr < end and tensor.untyped_storage().data_ptr() not in homes:
                        outside.append(f"{name}.{key}")
        return kwargs

    for _ in range(2):  # the first image records the order; the second computes from the ring
        pipe("a fox", num_inference_steps=3, width=64, height=64, guidance_scale=1.0, output_type="np",
             generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=after_step)
    assert streamer.chained and not outside, outside[:5]


@pytest.mark.parametrize("kind", KINDS)
def test_a_budget_plan_through_the_managed_pipeline_gives_the_unplanned_image(request, kind, clean_cache, monkeypatch):
    """The CPU plan path of ``load_pipeline(budget=...)`` on a CUDA-like fake device (no bf16: the weights load in
    fp16, and the budget is sized from the same weights), against plain diffusers in fp16."""
    from diffusers import DiffusionPipeline

    import mlnb

    folder = request.getfixturevalue(f"tiny_{kind}")
    reference = run(DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16)).astype(np.int16)
    budget = tiny_dit_stream_budget(DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16), monkeypatch, 20_000)
    managed = mlnb.load_pipeline(folder, budget=budget, device=FakeDevice(cuda_like=True))
    assert managed.plan.strategy == "stream" and managed.plan.streamed
    for _ in range(2):  # the first image records the orders; the second runs the chains
        result = managed.generate("a fox", steps=2, width=64, height=64, seed=1)
        diff = np.abs(np.asarray(result.images[0]).astype(np.int16) - reference)
        assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (diff.max(), diff.mean())
    assert all(s.chained for s in streamers_of(managed.pipe))


@pytest.mark.parametrize("kind", KINDS)
def test_t5_streams_block_by_block_and_holds_at_most_its_slots(request, kind, monkeypatch):
    """T5's units are its embedding, each ``encoder.block`` item and the final norm (its tied ``shared`` table is no
    unit: it never runs, and would leave the order unrecorded); while it encodes it holds two slots of its largest
    unit and one unit at a time points at device memory."""
    reference = run(_pipe(request, kind))
    pipe = _pipe(request, kind)
    t5 = _t5(pipe)
    per_block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in t5.encoder.block)
    budget = tiny_dit_stream_budget(pipe, monkeypatch, per_block)
    assert [n for n, _ in model_units(t5)] == (
        ["encoder.embed_tokens"] + [f"encoder.block.{i}" for i in range(len(t5.encoder.block))]
        + ["encoder.final_layer_norm"])
    held = []
    for name, module in model_units(t5):  # inside the streaming hook, which wraps the forward it finds

        def forward(*args, _forward=module.forward, **kwargs):
            ring = streamer.ring
            held.append((streamer.slots_in_use, ring.numel() if ring is not None else None))
            return _forward(*args, **kwargs)

        module.forward = forward
    plan = plan_for_budget(budget, model_facts(pipe), CardFacts(), Workload(64, 64, 1, 2))
    apply_plan(pipe, plan, "cpu", use_stream=False)
    streamer = module_streamer(t5)
    assert np.array_equal(run(pipe), reference)  # the first forward records the order
    held.clear()
    assert np.array_equal(run(pipe), reference)
    assert streamer.chained and streamer.order == list(streamer.units)
    # every unit computes from the ring, which holds two of the largest unit
    assert held and set(held) == {(2, 2 * streamer.slot_bytes)}
    assert 2 * streamer.slot_bytes < sum(p.numel() * p.element_size() for p in t5.parameters())
    assert streamer.slots_in_use == 0  # released when the encoder's forward ended


class _Opaque(torch.nn.Module):
    """A denoiser the planner does not know: no block list, so no unit it could stream."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))


def test_a_denoiser_the_planner_does_not_know_is_planned_whole_or_refused_in_one_line():
    denoiser = _Opaque()
    pipe = types.SimpleNamespace(transformer=denoiser, vae=None, components={"transformer": denoiser})
    facts = model_facts(pipe)
    assert facts.blocks == () and facts.denoiser_other == facts.denoiser > 0
    plan = plan_for_budget(8 * GiB, facts, CardFacts(), Workload(64, 64, 1, 2))
    assert plan.strategy == "resident" and not plan.streamed
    with pytest.raises(BudgetError) as refused:
        plan_for_budget(100_000, facts, CardFacts(), Workload(64, 64, 1, 2))
    message = str(refused.value)
    assert "\n" not in message and "no block list" in message and "planned as a whole" in message
    with pytest.raises(ValueError, match="has no unet or transformer to plan for"):
        model_facts(types.SimpleNamespace(components={}))


def test_native_size_is_the_pipeline_s_default(tiny_sd, request):
    """FluxPipeline's default is 128 latent pixels whatever its transformer (1024² for FLUX.1); SD3's is its
    transformer's ``sample_size``; a UNet pipeline's its UNet's. Times the VAE's scale (2 for the tiny VAEs)."""
    from diffusers import DiffusionPipeline

    assert native_size(_pipe(request, "flux")) == (256, 256)
    assert native_size(_pipe(request, "sd3")) == (64, 64)
    assert native_size(DiffusionPipeline.from_pretrained(tiny_sd)) == (64, 64)
    flux_like = types.SimpleNamespace(default_sample_size=128, vae_scale_factor=8, transformer=object())
    assert native_size(flux_like) == (1024, 1024)


@pytest.fixture(scope="module")
def flux_dev_facts():
    """FLUX.1-dev's real shapes (12 B transformer, T5-XXL) on the meta device: bytes without memory."""
    from mlnb.bench.models import build_arch_pipeline

    pipe = build_arch_pipeline("flux-dev", device="meta")
    return model_facts(pipe), [n for n, _ in denoiser_units(pipe.transformer)], native_size(pipe)


def test_flux_dev_fits_a_t4_by_streaming_its_transformer_in_execution_order(flux_dev_facts):
    facts, units, size = flux_dev_facts
    assert size == (1024, 1024)
    assert units[:3] == ["x_embedder", "time_text_embed", "context_embedder"] and units[-2:] == ["norm_out", "proj_out"]
    single = [n.rsplit(".", 1)[-1] for n in units if n.startswith("single_transformer_blocks.0.")]
    assert single == ["norm", "proj_mlp", "attn", "proj_out"]  # 270 MiB in bf16: cut, in the order it runs
    assert facts.denoiser > 20 * GiB and facts.encoder_slots < 1 * GiB < facts.encoders["text_encoder_2"]
    work = Workload(1024, 1024, 1, 20)
    plan = plan_for_budget(15 * GiB, facts, CardFacts(), work, host=float("inf"))
    assert plan.strategy == "stream" and not plan.fp8 and plan.predicted_peak <= 0.92 * 15 * GiB
    assert plan.streamed_bytes > 8 * GiB  # the rest of the 22 GiB stays on the card


def test_the_stored_flux_dev_facts_are_the_built_ones(flux_dev_facts):
    """tests/data/arch_facts.json, which the host RAM plans of tests/test_host_plan.py read, is FLUX.1-dev as built."""
    import json

    from test_host_plan import FACTS, facts_to_json

    assert json.loads(json.dumps(facts_to_json(flux_dev_facts[0]))) == json.loads(FACTS.read_text())["flux-dev"]


def test_flux_dev_is_stored_as_fp8_only_where_16_bit_weights_cannot_fit(flux_dev_facts):
    """Without card facts the planner prefers 16-bit weights: fp8 comes only where no 16-bit placement fits."""
    from mlnb.planner import search

    facts = flux_dev_facts[0]
    work = Workload(1024, 1024, 1, 20)
    card = CardFacts()
    for gib in (15, 8, 4, 2, 1.5, 1.2):
        budget = int(gib * GiB)
        try:
            plan = plan_for_budget(budget, facts, card, work, host=float("inf"))
        except BudgetError:
            continue
        fits_16 = any(p.predicted_peak <= search.usable_bytes(budget, card) and not p.fp8
                      for p in search._candidates(budget, facts, card, work))
        assert plan.fp8 is (not fits_16), gib


@pytest.mark.parametrize("kind", KINDS)
def test_a_plan_with_no_host_ram_to_pin_streams_from_the_mapping_and_gives_the_unplanned_image(request, kind, monkeypatch):
    """With no host RAM to pin, the streamed transformer units, the text encoders (T5 among them) and the VAE are
    copied from the safetensors files' mapping at every use: no pinned copy is made, their tensors at home are views
    of the mapped files, and the image is the unplanned one, twice (the second through the prefetch chains)."""
    from mlnb.planner.host_memory import weight_file_ranges
    from mlnb.planner.packed import MappedUnit

    reference = run(_pipe(request, kind))
    pipe = _pipe(request, kind)
    budget = tiny_dit_stream_budget(pipe, monkeypatch, 20_000)
    facts, work = model_facts(pipe), Workload(64, 64, 1, 2)
    plan = fit_host(plan_for_budget(budget, facts, CardFacts(), work), facts, CardFacts(), work, 0)
    assert plan.strategy == "stream" and plan.streamed and plan.pinned_bytes == 0
    assert set(plan.mapped_units) == set(plan.streamed)
    assert set(plan.mapped_models) == set(text_encoders(pipe)) | {"vae"}
    apply_plan(pipe, plan, "cpu", use_stream=False)
    files = weight_file_ranges()
    streamers = streamers_of(pipe)
    assert len(streamers) == 1 + len(text_encoders(pipe))
    for streamer in streamers:
        assert all(isinstance(unit, MappedUnit) and unit.region is None for unit in streamer.units.values())
        homes = [home for unit in streamer.units.values() for t, home in zip(unit.tensors, unit.home)
                 if isinstance(t, torch.nn.Parameter)]  # buffers such as position ids are made at load
        assert homes and all(any(lo <= t.data_ptr() < hi for lo, hi in files) for t in homes)
    assert isinstance(pipe.vae._mlnb_whole.unit, MappedUnit)
    assert np.array_equal(run(pipe), reference)
    assert np.array_equal(run(pipe), reference)
    assert all(s.chained for s in streamers)


@pytest.mark.parametrize("kept", [2, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_a_managed_plan_with_no_host_ram_casts_mapped_parts_as_they_are_copied(request, kind, kept, clean_cache,
                                                                             monkeypatch):
    """``load_pipeline(budget=...)`` on a CUDA-like fake device with ``MLNB_HOST_BUDGET`` at nothing: the fp32 files
    read as fp16 stay in the mapping and each part left there is cast as it is copied, on the copy stream. Where half
    the transformer fits the card, fp8 keeps it all there and the encoders and the VAE are copied from the mapping
    (each weight cast to fp8 as it is placed); where an eighth does, the streamed units are copied from the mapping
    too, in 16 bits. The image is plain diffusers' in fp16 within tolerance, twice."""
    from diffusers import DiffusionPipeline

    import mlnb
    from mlnb.planner import cost
    from mlnb.planner.packed import MappedUnit

    folder = request.getfixturevalue(f"tiny_{kind}")
    pipe16 = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16)
    reference = run(pipe16).astype(np.int16)
    tiny_dit_stream_budget(pipe16, monkeypatch, 20_000)  # the planner's reserves scaled down to the tiny model
    facts = model_facts(pipe16)
    _, decode, _ = cost.phase_terms(facts, None, Workload(64, 64, 1, 2), CardFacts())
    largest = max(b.nbytes for b in facts.blocks)
    held = facts.denoiser_other + sum(b.nbytes for b in facts.blocks) // kept
    budget = int((held + max(decode, 2 * largest + 100_000, facts.encoder_slots + 10_000)) / 0.92)
    monkeypatch.setenv("MLNB_HOST_BUDGET", "0")
    managed = mlnb.load_pipeline(folder, budget=budget, device=FakeDevice(cuda_like=True))
    plan = managed.plan
    assert plan.pinned_bytes == 0 and set(plan.mapped_models) == set(text_encoders(managed.pipe)) | {"vae"}
    if kept == 2:
        assert plan.fp8 and not plan.streamed
    else:
        assert not plan.fp8 and plan.streamed and plan.mapped_units == plan.streamed
    assert "left mapped from the files" in managed.choice.reason
    for _ in range(2):
        result = managed.generate("a fox", steps=2, width=64, height=64, seed=1)
        diff = np.abs(np.asarray(result.images[0]).astype(np.int16) - reference)
        assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (diff.max(), diff.mean())
    streamers = streamers_of(managed.pipe)
    assert streamers and all(s.chained for s in streamers)
    assert all(isinstance(u, MappedUnit) for s in streamers for u in s.units.values())
