"""The compute dtype per card and model family, the fp32 modules a text encoder keeps, and the guard that turns NaN
in a generation into one line: pure choices, the fake T4 and Ampere cards, tiny SD3 and Flux pipelines, a magic round
trip, and ``gpu`` tests of tiny SD3 and Flux in fp16 and bf16 on the real card."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import mlnb
from mlnb.device import CpuDevice, use_device
from mlnb.errors import InvalidArgumentError, NonFiniteOutputError
from mlnb.pipeline import cached_pipelines
from mlnb.pipeline import precision
from mlnb.pipeline.files import load_dtype, read_model_index
from mlnb.pipeline.finite import FiniteGuard, non_finite_message
from mlnb.pipeline.precision import ModelFamily, choose_dtype, model_family, pipeline_family, restore_fp32_modules
from mlnb.testing import FakeDevice
from fakes import run_cell, usage_error

FAST = dict(steps=2, width=64, height=64, seed=1)
UNET, SD3, FLUX, OTHER = ModelFamily.UNET, ModelFamily.SD3, ModelFamily.FLUX, ModelFamily.TRANSFORMER


def _wo(pipe):
    """The first T5 feed-forward output projection of a tiny SD3 (text_encoder_3) or Flux (text_encoder_2)."""
    t5 = getattr(pipe, "text_encoder_3", None) or pipe.text_encoder_2
    return t5.encoder.block[0].layer[1].DenseReluDense.wo


# -- the policy, pure --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, cpu, t4, ampere", [
    (UNET, "fp32", "fp16", "fp16"),
    (SD3, "fp32", "fp16", "bf16"),
    (FLUX, "fp32", "fp16", "bf16"),
    (OTHER, "fp32", "fp16", "bf16"),
])
def test_the_default_dtype_per_card_and_family_is_the_table(family, cpu, t4, ampere):
    assert choose_dtype(family, cuda=False).dtype == cpu
    assert choose_dtype(family, cuda=True, compute_capability=(7, 5)).dtype == t4
    assert choose_dtype(family, cuda=True, compute_capability=(7, 0)).dtype == t4  # a V100
    assert choose_dtype(family, cuda=True, compute_capability=(8, 0)).dtype == ampere
    assert choose_dtype(family, cuda=True, compute_capability=(9, 0)).dtype == ampere
    assert choose_dtype(family, cuda=True, compute_capability=None).dtype == t4  # unknown: no bf16 assumed


@pytest.mark.parametrize("requested", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("cuda, capability", [(False, None), (True, (7, 5)), (True, (8, 6))])
def test_a_requested_dtype_is_respected(requested, cuda, capability):
    choice = choose_dtype(FLUX, cuda=cuda, compute_capability=capability, requested=requested)
    assert choice.dtype == requested
    slow = requested == "bf16" and cuda and capability < (8, 0)
    assert (choice.warning is not None) is slow


def test_bf16_on_a_card_that_only_emulates_it_is_said_to_be_slow_and_refused_where_it_cannot_run():
    warning = choose_dtype(SD3, cuda=True, compute_capability=(7, 5), requested="bf16", card="Tesla T4").warning
    assert "Tesla T4 (compute capability 7.5)" in warning and "emulates" in warning and "dtype='fp16'" in warning
    with pytest.raises(InvalidArgumentError, match=r"Tesla P100 .*cannot compute bf16; use dtype='fp16'"):
        choose_dtype(SD3, cuda=True, compute_capability=(6, 0), bf16_works=False, requested="bf16", card="Tesla P100")
    with pytest.raises(InvalidArgumentError, match="unknown dtype 'fp8'"):
        choose_dtype(SD3, cuda=True, requested="fp8")


@pytest.mark.parametrize("index, family", [
    ({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}, UNET),
    ({"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}, UNET),
    ({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}, SD3),
    ({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}, FLUX),
    ({"_class_name": "Flux2Pipeline", "transformer": ["diffusers", "Flux2Transformer2DModel"]}, FLUX),
    ({"_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}, OTHER),
    ({"_class_name": "FluxPipeline", "transformer": [None, None]}, UNET),  # no denoiser named
    (None, UNET),  # a hub model not in the cache
])
def test_the_model_family_is_read_from_the_denoiser_s_class(index, family):
    assert model_family(index) is family


def test_the_error_line_says_what_to_load_on_each_card():
    line = non_finite_message("black-forest-labs/FLUX.1-dev", FLUX, "fp16", 2, 20, cuda=True, native_bf16=False,
                              card="Tesla T4")
    assert line == ("Flux 'black-forest-labs/FLUX.1-dev' in fp16 produced NaN or inf at denoising step 3 of 20: the "
                    "Tesla T4 has no bf16, so it ran in fp16, which overflows past 65504; load with dtype='fp32' "
                    "(twice the memory) or use a card with bf16; the pipeline stays loaded")
    assert "\n" not in line
    assert "dtype='bf16'" in non_finite_message("m", SD3, "fp16", 0, 2, cuda=True, native_bf16=True, card="A10G")
    assert "dtype='fp32'" in non_finite_message("m", SD3, "bf16", 0, 2, cuda=True, native_bf16=True, card="A10G")
    decode = non_finite_message("m", UNET, "fp32", None, 2, cuda=False, native_bf16=False, card="CPU")
    assert "in the VAE decode (the latents were finite)" in decode and "damaged file or LoRA" in decode


# -- the fake cards ----------------------------------------------------------------------------------------------------

def test_the_fake_cards_report_what_the_real_ones_do():
    t4, ampere = FakeDevice.card("t4").info(), FakeDevice.card("ampere").info()
    assert (t4.name, t4.compute_capability, t4.native_bf16, t4.supports_bf16) == ("simulated Tesla T4", (7, 5), False, True)
    assert (ampere.compute_capability, ampere.native_bf16) == ((8, 6), True)
    assert FakeDevice.card("t4").is_cuda and not FakeDevice.card("t4", cuda_like=False).is_cuda
    assert FakeDevice.card("ampere", total=8 * 2**30).total == 8 * 2**30
    with pytest.raises(ValueError, match="unknown card 'k80'"):
        FakeDevice.card("k80")


@pytest.mark.parametrize("kind, t4, ampere", [
    ("sd", torch.float16, torch.float16),
    ("sdxl", torch.float16, torch.float16),
    ("sd3", torch.float16, torch.bfloat16),
    ("flux", torch.float16, torch.bfloat16),
])
def test_load_dtype_per_fake_card_and_tiny_model(kind, t4, ampere, request):
    index = read_model_index(request.getfixturevalue(f"tiny_{kind}"))
    assert load_dtype(None, FakeDevice.card("t4"), index) == t4
    assert load_dtype(None, FakeDevice.card("ampere"), index) == ampere
    assert load_dtype(None, CpuDevice(), index) == torch.float32
    assert load_dtype(None, FakeDevice(), index) == torch.float32  # a fake card computing on the CPU, as it is
    assert load_dtype("fp32", FakeDevice.card("ampere"), index) == torch.float32
    assert load_dtype(torch.float16, FakeDevice.card("ampere"), index) == torch.float16


def test_on_a_gpu_a_hub_model_s_index_is_fetched_first_so_its_first_load_gets_its_family_s_dtype(tiny_flux,
                                                                                                    monkeypatch):
    """A hub Flux not in the cache: on a card with bf16 the index is downloaded before the weights and the load is
    bf16, as every later load from the cache is; on a CPU nothing is fetched; offline, the index is None."""
    import huggingface_hub

    from mlnb.pipeline.files import model_index

    fetched = []

    def download(repo, filename, **kwargs):
        fetched.append((repo, filename))
        return str(tiny_flux / "model_index.json")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert model_index("org/flux", False, {}) is None and fetched == []  # not asked to fetch
    index = model_index("org/flux", False, {}, fetch=True)
    assert fetched == [("org/flux", "model_index.json")]
    assert load_dtype(None, FakeDevice.card("ampere"), index) == torch.bfloat16

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert model_index("org/flux", False, {}, fetch=True) is None


@pytest.mark.parametrize("device, dtype, fetch", [
    (FakeDevice.card("ampere"), None, True), (CpuDevice(), None, False), (FakeDevice.card("ampere"), "fp16", False),
], ids=["fake-ampere", "cpu", "dtype-given"])
def test_a_load_fetches_the_index_only_on_a_cuda_card_without_a_dtype_given(monkeypatch, device, dtype, fetch):
    from mlnb.pipeline import loading

    asked = []

    class Stop(Exception):
        pass

    def index(source, is_local, kwargs, fetch=False):
        asked.append(fetch)
        raise Stop

    monkeypatch.setattr(loading, "model_index", index)
    with pytest.raises(Stop):
        loading.load_pipeline("org/flux", dtype=dtype, device=device)
    assert asked == [fetch]


def test_bf16_asked_of_a_t4_is_said_once_per_process(tiny_flux, caplog, monkeypatch):
    monkeypatch.setattr(precision, "_said", set())
    with caplog.at_level(logging.DEBUG, logger="mlnb.pipeline.precision"):
        for _ in range(3):
            assert load_dtype("bf16", FakeDevice.card("t4"), read_model_index(tiny_flux)) == torch.bfloat16
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Tesla T4" in warnings[0].getMessage() and "emulates" in warnings[0].getMessage()
    with pytest.raises(InvalidArgumentError, match="cannot compute bf16"):
        load_dtype("bf16", FakeDevice.card("t4", supports_bf16=False), read_model_index(tiny_flux))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_tiny_sd3_and_flux_load_in_fp16_on_a_t4_with_t5_s_wo_in_fp32_and_bf16_on_ampere(kind, request, clean_cache):
    folder = request.getfixturevalue(f"tiny_{kind}")
    on_t4 = mlnb.load_pipeline(folder, level="none", device=FakeDevice.card("t4"))
    assert on_t4.dtype == torch.float16 and on_t4.pipe.transformer.dtype == torch.float16
    assert _wo(on_t4.pipe).weight.dtype == torch.float32  # transformers' _keep_in_fp32_modules
    assert pipeline_family(on_t4.pipe) is {"sd3": SD3, "flux": FLUX}[kind]
    on_ampere = mlnb.load_pipeline(folder, level="none", device=FakeDevice.card("ampere"))
    assert on_ampere.dtype == torch.bfloat16 and on_ampere.pipe.transformer.dtype == torch.bfloat16


def test_a_t5_given_already_cast_to_fp16_gets_its_wo_back_in_fp32(tiny_flux, clean_cache):
    from transformers import T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(tiny_flux / "text_encoder_2").to(torch.float16)
    assert _wo(type("P", (), {"text_encoder_2": t5})()).weight.dtype == torch.float16  # what .to() does
    managed = mlnb.load_pipeline(tiny_flux, level="none", dtype="fp16", device=FakeDevice.card("t4"),
                                 text_encoder_2=t5)
    assert managed.pipe.text_encoder_2 is t5
    assert _wo(managed.pipe).weight.dtype == torch.float32
    assert managed.pipe.text_encoder_2.shared.weight.dtype == torch.float16  # only the declared modules
    assert restore_fp32_modules(managed.pipe) == []  # nothing left to restore
    result = managed.generate("a fox", **FAST)
    assert np.asarray(result.images[0]).std() > 0


# -- the guard ---------------------------------------------------------------------------------------------------------

def _latents(nan: bool):
    x = torch.randn(1, 4, 8, 8)
    if nan:
        x[0, 0, 0, 0] = float("nan")
    return x


def test_the_guard_on_the_cpu_stops_at_the_first_non_finite_step():
    guard = FiniteGuard("m", FLUX, "fp16", CpuDevice(), steps=4)
    guard.step(0, _latents(False))
    guard.step(1, _latents(False))
    with pytest.raises(NonFiniteOutputError, match="at denoising step 3 of 4"):
        guard.step(2, _latents(True))


def test_the_guard_on_a_cuda_card_reads_its_flag_only_at_the_first_step_and_after_the_call(monkeypatch):
    guard = FiniteGuard("m", FLUX, "fp16", FakeDevice.card("t4"), steps=4)
    reads = []
    real = FiniteGuard._raise_if_bad
    monkeypatch.setattr(FiniteGuard, "_raise_if_bad", lambda self, decode: (reads.append(decode), real(self, decode)))
    for step, nan in enumerate([False, False, True, False]):
        guard.step(step, _latents(nan))  # NaN at step 3: noticed after the call, not by a wait at that step
    assert reads == [False]
    with pytest.raises(NonFiniteOutputError, match="at denoising step 3 of 4: the simulated Tesla T4 has no bf16"):
        guard.check()
    assert reads == [False, True]
    with pytest.raises(NonFiniteOutputError, match="at denoising step 1 of 4"):
        FiniteGuard("m", FLUX, "fp16", FakeDevice.card("t4"), steps=4).step(0, _latents(True))


def test_the_guard_passes_the_user_s_callback_what_it_returns():
    guard = FiniteGuard("m", SD3, "bf16", CpuDevice(), steps=2)
    seen = []

    def user(pipe, step, timestep, kwargs):
        seen.append(step)
        return {"latents": kwargs["latents"] * 0}

    out = guard.callback(then=user)(None, 0, 999, {"latents": _latents(False)})
    assert seen == [0] and float(out["latents"].abs().sum()) == 0
    assert guard.callback()(None, 1, 1, {"prompt_embeds": 1}) == {"prompt_embeds": 1}  # no latents: nothing read
    guard.check()


@pytest.fixture(scope="module")
def hot_flux(tiny_flux, tmp_path_factory):
    """The tiny Flux with its output projection scaled by 1e7: its velocity overflows fp16 (past 65504) at the first
    step and stays finite in fp32, as a model trained in bf16 can overflow fp16."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_flux)
    with torch.no_grad():
        pipe.transformer.proj_out.weight.mul_(1e7)
    folder = tmp_path_factory.mktemp("hot") / "flux"
    pipe.save_pretrained(folder)
    return folder


def test_flux_that_overflows_fp16_on_a_t4_says_so_in_one_line_and_runs_in_fp32(hot_flux, clean_cache):
    managed = mlnb.load_pipeline(hot_flux, level="none", device=FakeDevice.card("t4"))
    assert managed.dtype == torch.float16
    with pytest.raises(NonFiniteOutputError) as caught:
        managed.generate("a fox", **FAST)
    line = str(caught.value)
    assert line.startswith(f"Flux {str(hot_flux)!r} in fp16 produced NaN or inf at denoising step 1 of 2: the simulated "
                           "Tesla T4 has no bf16") and "dtype='fp32'" in line and "\n" not in line
    assert any(c is managed for c in cached_pipelines())  # still loaded
    fp32 = mlnb.load_pipeline(hot_flux, level="none", dtype="fp32", device=FakeDevice.card("t4"))
    assert np.isfinite(np.asarray(fp32.generate("a fox", **FAST).images[0], dtype=float)).all()


def _nan_output(module, args, output):
    """A forward hook that turns a module's output into NaN."""
    if isinstance(output, tuple):
        return (output[0] * float("nan"),) + output[1:]
    sample = getattr(output, "sample", None)
    if sample is not None:
        output.sample = sample * float("nan")
        return output
    return output * float("nan")


def test_a_nan_step_leaves_the_cached_pipeline_usable(tiny_sd, clean_cache):
    device = FakeDevice.card("t4")
    managed = mlnb.load_pipeline(tiny_sd, level="none", device=device)
    reference = managed.generate("a fox", **FAST)
    handle = managed.pipe.unet.register_forward_hook(_nan_output)
    try:
        with pytest.raises(NonFiniteOutputError, match=r"UNet .* in fp16 produced NaN or inf at denoising step 1"):
            managed.generate("a fox", **FAST)
    finally:
        handle.remove()
    again = mlnb.load_pipeline(tiny_sd, level="none", device=device)
    assert again is managed
    assert np.array_equal(np.asarray(again.generate("a fox", **FAST).images[0]), np.asarray(reference.images[0]))


def test_a_vae_that_decodes_to_nan_is_caught_after_finite_latents(tiny_sd, clean_cache):
    managed = mlnb.load_pipeline(tiny_sd, level="none", device=CpuDevice())
    handle = managed.pipe.vae.decoder.register_forward_hook(_nan_output)
    try:
        with pytest.raises(NonFiniteOutputError, match=r"in fp32 produced NaN or inf in the VAE decode"):
            managed.generate("a fox", **FAST)
    finally:
        handle.remove()
    assert not managed.pipe.vae.decoder._forward_hooks  # the guard's hook went with the call
    managed.generate("a fox", **FAST)


def test_generate_shows_a_nan_as_one_line(ip, hot_flux, clean_cache, capsys, fresh_defaults, fresh_outputs):
    with use_device(FakeDevice.card("t4")):
        cell = f"%%generate --model {hot_flux} --steps 2 --width 64 --height 64 --level none --quiet\na fox"
        text = usage_error(ip, cell, capsys)
        assert "produced NaN or inf at denoising step 1 of 2" in text and "Tesla T4 has no bf16" in text
        assert run_cell(ip, "1 + 1").error_in_exec is None  # the kernel goes on


# -- the real card -----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_tiny_sd3_and_flux_stay_finite_on_the_card(kind, dtype, request, clean_cache):
    """The guard raises where a step's latents or the decode are not finite; the image is not black."""
    managed = mlnb.load_pipeline(request.getfixturevalue(f"tiny_{kind}"), level="none", dtype=dtype)
    assert managed.pipe.transformer.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if dtype == "fp16":
        assert _wo(managed.pipe).weight.dtype == torch.float32
    image = np.asarray(managed.generate("a watercolor fox", steps=4, width=64, height=64, seed=1).images[0])
    assert image.std() > 0


@pytest.mark.gpu
def test_an_overflow_is_caught_on_the_card_and_fp32_runs(hot_flux, clean_cache):
    managed = mlnb.load_pipeline(hot_flux, level="none", dtype="fp16")
    with pytest.raises(NonFiniteOutputError, match="in fp16 produced NaN or inf at denoising step 1 of 2"):
        managed.generate("a fox", **FAST)
    image = mlnb.load_pipeline(hot_flux, level="none", dtype="fp32").generate("a fox", **FAST).images[0]
    assert np.asarray(image).std() > 0
