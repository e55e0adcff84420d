"""MemoryOptimizer on tiny real diffusers pipelines: eleven honest results per level, techniques that really
change the pipeline, and the SDXL force_upcast trap under group offloading (with a CUDA-like fake device)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mlnb.device import CpuDevice
from mlnb.levels import MemoryOptimizationConfig, OptimizationLevel, Technique, choose_vae_tile
from mlnb.optimizer import MemoryOptimizer, OptimizationReport
from mlnb.testing import FakeDevice

L = OptimizationLevel
OFFLOADS = {"model_cpu_offload", "sequential_cpu_offload", "group_offload"}
CUDA_ONLY = OFFLOADS | {"xformers", "cuda_cache_clear"}

# What actually runs on a CPU at each level.
APPLIED_ON_CPU = {
    L.NONE: {"gc_collect"},
    L.BALANCED: {"vae_tiling", "gc_collect"},
    L.AGGRESSIVE: {"vae_tiling", "vae_slicing", "gc_collect"},
    L.ULTRA: {"vae_tiling", "vae_slicing", "fp8_storage", "gc_collect"},
}


def load(folder, dtype=torch.float32):
    """A fresh pipeline straight from diffusers (each optimization needs its own: it cannot be undone)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return pipe


def run(pipe, size=64, steps=1):
    # guidance 1 skips classifier-free guidance: one UNet batch instead of two, same code paths otherwise
    return pipe(
        "a fox", num_inference_steps=steps, width=size, height=size, guidance_scale=1.0, output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
    ).images


pytestmark = pytest.mark.usefixtures("frozen_heap")


# ---------------------------------------------------------------------------------------------------------------
# Every level on the CPU


@pytest.mark.parametrize("level", list(L), ids=lambda lv: lv.value)
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_every_level_reports_eleven_honest_results_on_cpu(request, kind, level):
    """Eleven results in technique order, each applied or skipped with a reason; on a CPU exactly the VAE, fp8
    and gc techniques run, the CUDA-only ones say CUDA, slicing defers to SDPA, and UNet2DConditionModel has no
    forward chunking."""
    pipe = load(request.getfixturevalue(f"tiny_{kind}"))
    config = MemoryOptimizationConfig.from_level(level)
    report = MemoryOptimizer(config, CpuDevice()).optimize_pipeline(pipe)

    assert isinstance(report, OptimizationReport) and report.level is level
    assert len(report) == 11
    assert [r.technique for r in report] == list(Technique)
    for result in report:
        assert isinstance(result.applied, bool)
        assert result.detail.strip(), result.technique
    assert {r.technique.value for r in report.applied} == APPLIED_ON_CPU[level]

    for result in report:
        name = result.technique.value
        if not getattr(config, name):
            assert not result.applied
            assert result.detail == f"not part of level {level.value}"
        elif name in CUDA_ONLY:
            assert not result.applied and "CUDA" in result.detail, result
    if config.attention_slicing:
        assert "SDPA" in report["attention_slicing"].detail
    if config.forward_chunking:
        detail = report["forward_chunking"].detail
        assert "UNet2DConditionModel" in detail and "enable_forward_chunking" in detail
    # The one-line summary names applied techniques only.
    for result in report.skipped:
        assert result.label is None or result.label not in report.summary()
    assert pipe._mlnb_optimized == level.value
    assert str(report).splitlines()[0].startswith(f"level {level.value}: ")


def test_optimizing_twice_raises(tiny_sd):
    """Offload hooks cannot be stacked or undone, so a second optimization refuses and says why."""
    pipe = load(tiny_sd)
    MemoryOptimizer(MemoryOptimizationConfig.from_level("none"), CpuDevice()).optimize_pipeline(pipe)
    with pytest.raises(RuntimeError, match="already optimized at level none"):
        MemoryOptimizer(MemoryOptimizationConfig.from_level("ultra"), CpuDevice()).optimize_pipeline(pipe)


# ---------------------------------------------------------------------------------------------------------------
# Techniques really change the pipeline


def test_vae_tiling_changes_the_vae(tiny_sd):
    """Tiling turns on the VAE's own switch and sets the tile in pixels and latents (the VAE's 2x scale here)."""
    pipe = load(tiny_sd)
    assert pipe.vae.use_tiling is False
    config = MemoryOptimizationConfig.from_level("balanced", vae_tile_size=128)
    report = MemoryOptimizer(config, CpuDevice()).optimize_pipeline(pipe)
    assert pipe.vae.use_tiling is True
    assert pipe.vae.tile_sample_min_size == 128
    assert pipe.vae.tile_latent_min_size == 64
    assert report["vae_tiling"].label == "VAE fp32 tiles 128"
    with pytest.raises(KeyError, match="'vae_tilling' is not a technique; use one of model_cpu_offload, "):
        report["vae_tilling"]  # a typo: a mapping's KeyError, with the names


def test_vae_tile_is_chosen_for_the_budget_when_not_given(tiny_sd):
    """Without a configured size the tile comes from ``choose_vae_tile`` (capped at the VAE's sample size)."""
    pipe = load(tiny_sd)
    MemoryOptimizer(MemoryOptimizationConfig.from_level("ultra"), CpuDevice()).optimize_pipeline(pipe)
    expected = choose_vae_tile(None, pipe.vae.config.sample_size, L.ULTRA)
    assert pipe.vae.tile_sample_min_size == expected
    assert pipe.vae.use_slicing is True


@pytest.mark.parametrize("tile, tiled", [(64, True), (128, False)])
def test_configured_tile_size_decides_whether_decode_is_tiled(tiny_sd, monkeypatch, tile, tiled):
    """A 128x128 image decoded with 64 px tiles really goes through ``vae.tiled_decode``; with 128 px tiles the
    image fits one tile and does not."""
    pipe = load(tiny_sd)
    config = MemoryOptimizationConfig.from_level("balanced", vae_tile_size=tile)
    MemoryOptimizer(config, CpuDevice()).optimize_pipeline(pipe)
    calls = []
    original = pipe.vae.tiled_decode

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe.vae, "tiled_decode", spy)
    images = run(pipe, size=128)
    assert images.shape == (1, 128, 128, 3)
    assert bool(calls) is tiled


@pytest.mark.parametrize("tile", [64, 48])
def test_tile_seams_are_blended_at_once_with_diffusers_weights(tiny_sd, tile):
    """diffusers blends each seam between tiles row by row in a Python loop; mlnb's tiles blend each seam in one
    operation. The image is the same: bitwise with a 16 px overlap (a power of two), within float rounding with
    12 px. Partial tiles at the edges included; the VAE's class is untouched."""
    from diffusers import AutoencoderKL

    from mlnb.optimizer.vae import blend_seams_at_once, set_vae_tiles

    vae = load(tiny_sd).vae
    set_vae_tiles(vae, tile, blend_at_once=False)
    assert "blend_v" not in vars(vae)
    side = 2 * vae.tile_latent_min_size + 3  # two whole tiles and part of a third, each way
    z = torch.randn(1, vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = vae.decode(z).sample
        assert blend_seams_at_once(vae) and "blend_v" in vars(vae) and "blend_h" in vars(vae)
        at_once = vae.decode(z).sample
    if tile == 64:
        assert torch.equal(at_once, plain)
    else:
        assert torch.allclose(at_once, plain, atol=1e-6)
    assert AutoencoderKL.blend_v.__qualname__ == "AutoencoderKL.blend_v"
    assert blend_seams_at_once(torch.nn.Linear(2, 2)) is False


def test_an_upcast_vae_decodes_in_bf16_close_to_the_fp32_decode_and_stays_bf16(tiny_sdxl):
    """SDXL in fp16 upcasts its VAE to fp32 for each decode. Stored in bf16 instead, the pipeline no longer upcasts
    it: the latents are cast to bf16 as they enter, the decoder's output comes out in fp32, and the image is within
    bf16's rounding of the fp32 decode."""
    from mlnb.optimizer.offload import vae_needs_upcast
    from mlnb.optimizer.vae import decode_in_bf16, vae_decode_dtype

    pipe = load(tiny_sdxl, torch.float16)
    assert vae_needs_upcast(pipe) and vae_decode_dtype(pipe) == "fp32"
    reference = run(pipe)
    assert pipe.vae.dtype == torch.float16  # diffusers cast it back after its fp32 decode
    assert decode_in_bf16(pipe)
    assert pipe.vae.dtype == torch.bfloat16 and not vae_needs_upcast(pipe) and vae_decode_dtype(pipe) == "bf16"
    outputs = []
    pipe.vae.decoder.register_forward_hook(lambda m, a, out: outputs.append(out.dtype))
    image = run(pipe)
    assert outputs == [torch.float32]  # the post-processing rounds from fp32
    assert pipe.vae.dtype == torch.bfloat16  # nothing upcast it during the call
    assert np.isfinite(image).all() and image.shape == reference.shape
    assert np.abs(image - reference).max() < 0.02 and np.abs(image - reference).mean() < 0.003


def test_only_a_vae_the_pipeline_upcasts_goes_to_bf16(tiny_sd, tiny_sdxl):
    from mlnb.optimizer.vae import decode_in_bf16

    sd = load(tiny_sd, torch.float16)  # SD's pipeline never upcasts its VAE
    sdxl = load(tiny_sdxl)  # an fp32 SDXL VAE is not upcast either
    assert not decode_in_bf16(sd) and not decode_in_bf16(sdxl)
    assert sd.vae.dtype == torch.float16 and sdxl.vae.dtype == torch.float32


def test_fp8_storage_stores_denoiser_weights_in_fp8_and_still_generates(tiny_sd):
    """At ultra the UNet's linear and conv weights are stored as float8_e4m3fn; norms and the text encoder keep
    their dtype; a generation still gives a finite image."""
    pipe = load(tiny_sd)
    report = MemoryOptimizer(MemoryOptimizationConfig.from_level("ultra"), CpuDevice()).optimize_pipeline(pipe)
    assert report.is_applied("fp8_storage")
    unet = pipe.unet
    linear = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert linear.weight.dtype == torch.float8_e4m3fn
    assert unet.conv_in.weight.dtype == torch.float8_e4m3fn
    assert unet.down_blocks[0].resnets[0].norm1.weight.dtype == torch.float32
    dtypes = {p.dtype for p in unet.parameters()}
    assert torch.float8_e4m3fn in dtypes
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.float32}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
    images = run(pipe)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    assert "computed in fp32" in report["fp8_storage"].detail


# ---------------------------------------------------------------------------------------------------------------
# Offload calls on a CUDA-like device, and the SDXL force_upcast trap


@pytest.fixture
def recorded(monkeypatch):
    """Replace the pipeline's offload entry points and ``vae.to`` with recorders (the real ones need CUDA)."""

    def install(pipe):
        calls: dict[str, list] = {"group": [], "model": [], "sequential": [], "vae_to": [], "pipe_to": []}
        monkeypatch.setattr(pipe, "enable_group_offload", lambda **kw: calls["group"].append(kw))
        monkeypatch.setattr(pipe, "enable_model_cpu_offload", lambda **kw: calls["model"].append(kw))
        monkeypatch.setattr(pipe, "enable_sequential_cpu_offload", lambda **kw: calls["sequential"].append(kw))
        monkeypatch.setattr(pipe.vae, "to", lambda *a, **kw: calls["vae_to"].append((a, kw)))
        monkeypatch.setattr(pipe, "to", lambda *a, **kw: calls["pipe_to"].append((a, kw)))
        return calls

    return install


def test_sdxl_fp16_force_upcast_keeps_the_vae_out_of_group_offload(tiny_sdxl, recorded):
    """SDXL in fp16 with ``force_upcast``: group offload excludes the VAE and the VAE is placed on the device, so
    the fp32 upcast at decode cannot hit the group-offload dtype crash; the report says why."""
    pipe = load(tiny_sdxl, torch.float16)
    assert pipe.vae.config.force_upcast
    calls = recorded(pipe)
    device = FakeDevice(cuda_like=True)
    report = MemoryOptimizer(MemoryOptimizationConfig.from_level("ultra"), device).optimize_pipeline(pipe)
    assert len(calls["group"]) == 1
    kwargs = calls["group"][0]
    assert kwargs["exclude_modules"] == ["vae"]
    assert kwargs["offload_type"] == "leaf_level" and kwargs["use_stream"] is True
    assert kwargs["onload_device"] == torch.device(device.torch_device)
    assert kwargs["offload_device"] == torch.device("cpu")
    assert calls["vae_to"] == [((device.torch_device,), {})]
    assert calls["model"] == calls["sequential"] == calls["pipe_to"] == []
    group = report["group_offload"]
    assert group.applied and group.label == "group offload leaf+stream"
    assert "VAE kept on GPU" in group.detail and "force_upcast" in group.detail
    assert report["vae_tiling"].label.startswith("VAE fp32 tiles")  # the decode really runs in fp32


def test_sd_fp16_group_offload_excludes_nothing(tiny_sd, recorded):
    """SD's VAE has no upcast: every component is group-offloaded and the VAE is not moved on its own."""
    pipe = load(tiny_sd, torch.float16)
    calls = recorded(pipe)
    config = MemoryOptimizationConfig.from_level("aggressive")
    report = MemoryOptimizer(config, FakeDevice(cuda_like=True)).optimize_pipeline(pipe)
    assert len(calls["group"]) == 1
    assert calls["group"][0]["exclude_modules"] is None
    assert calls["group"][0]["use_stream"] is False
    assert calls["vae_to"] == []
    assert report["group_offload"].label == "group offload leaf"
    assert "VAE kept" not in report["group_offload"].detail
    assert report["vae_tiling"].label.startswith("VAE fp16 tiles")


def test_sdxl_fp32_needs_no_exclusion(tiny_sdxl, recorded):
    """The trap is the fp16 upcast: an fp32 SDXL VAE is offloaded like everything else."""
    pipe = load(tiny_sdxl)
    calls = recorded(pipe)
    MemoryOptimizer(MemoryOptimizationConfig.from_level("ultra"), FakeDevice(cuda_like=True)).optimize_pipeline(pipe)
    assert calls["group"][0]["exclude_modules"] is None
    assert calls["vae_to"] == []


def test_balanced_uses_model_offload_and_none_places_the_pipeline(tiny_sd, recorded):
    """On a CUDA device, balanced installs model offload on that device only; with no offload the whole pipeline
    is moved to the device."""
    device = FakeDevice(cuda_like=True)
    pipe = load(tiny_sd)
    calls = recorded(pipe)
    report = MemoryOptimizer(MemoryOptimizationConfig.from_level("balanced"), device).optimize_pipeline(pipe)
    assert calls["model"] == [{"device": device.torch_device}]
    assert calls["group"] == calls["sequential"] == calls["pipe_to"] == []
    assert report.is_applied("model_cpu_offload") and not report.is_applied("group_offload")
    assert report.is_applied("cuda_cache_clear")  # the fake device has a cache to clear
    assert device.empty_cache_calls == 1

    pipe = load(tiny_sd)
    calls = recorded(pipe)
    MemoryOptimizer(MemoryOptimizationConfig.from_level("none"), device).optimize_pipeline(pipe)
    assert calls["pipe_to"] == [((device.torch_device,), {})]
    assert calls["model"] == calls["group"] == calls["sequential"] == []


def test_group_offload_falls_back_to_sequential_without_it(tiny_sd, recorded, monkeypatch):
    """On a diffusers without ``enable_group_offload`` the group offload is skipped with the reason and
    sequential offload runs instead, as the fallback."""
    pipe = load(tiny_sd)
    calls = recorded(pipe)
    from diffusers import DiffusionPipeline

    monkeypatch.delattr(pipe, "enable_group_offload")  # the recorder on the instance
    monkeypatch.delattr(DiffusionPipeline, "enable_group_offload")  # and the method itself
    config = MemoryOptimizationConfig.from_level("aggressive")
    report = MemoryOptimizer(config, FakeDevice(cuda_like=True)).optimize_pipeline(pipe)
    assert not report.is_applied("group_offload")
    assert "enable_group_offload" in report["group_offload"].detail
    assert report.is_applied("sequential_cpu_offload")
    assert "fallback" in report["sequential_cpu_offload"].detail
    assert len(calls["sequential"]) == 1


@pytest.mark.parametrize("available,pins_on_the_fly", [(None, False), (10**12, False), (1000, True)])
def test_streams_pin_on_the_fly_when_host_ram_is_short(tiny_sd, recorded, monkeypatch, available, pins_on_the_fly):
    """Streams pre-pin a host copy (about 2x the weights): with less host RAM free than that, diffusers is told to
    pin on the fly (``low_cpu_mem_usage=True``) and the report says so; otherwise it pre-pins."""
    pipe = load(tiny_sd, torch.float16)
    calls = recorded(pipe)
    device = FakeDevice(cuda_like=True)
    info = device.info()
    monkeypatch.setattr(device, "info", lambda: dataclasses.replace(info, host_available_bytes=available))
    report = MemoryOptimizer(MemoryOptimizationConfig.from_level("ultra"), device).optimize_pipeline(pipe)
    assert calls["group"][0]["low_cpu_mem_usage"] is pins_on_the_fly
    assert ("pins on the fly" in report["group_offload"].detail) is pins_on_the_fly


def test_the_optimizer_takes_a_config_and_a_pipeline_and_says_so_otherwise():
    import torch

    with pytest.raises(TypeError, match=r"config must be a MemoryOptimizationConfig \(MemoryOptimizationConfig.from_level\('balanced'\)\?\)"):
        MemoryOptimizer("balanced")
    optimizer = MemoryOptimizer(MemoryOptimizationConfig.from_level("none"), CpuDevice())
    for thing in (object(), torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match="optimize_pipeline takes a diffusers pipeline, got"):
            optimizer.optimize_pipeline(thing)
