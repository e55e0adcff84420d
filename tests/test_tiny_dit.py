"""The tiny SD3 and Flux pipelines (mlnb.tiny.dit): real diffusers folders with transformer denoisers, loaded
through ``load_pipeline`` at every level on the CPU.

Image tolerance against level ``none``: at most 12/255 on any pixel channel and 2/255 on average. Levels balanced and
aggressive change only how the VAE decodes (fp32 tiles) and, for SD3, feed-forward chunking, which reorders float
sums (measured: at most 1/255). Level ultra stores the transformer's weights as fp8 (e4m3, about 2 significant
digits) and computes in fp32 (measured: at most 3/255, 0.45/255 on average). A different seed changes the image by
about 40/255 on average, so the tolerance still tells a wrong image from a right one; a different prompt changes a
random-weight image by only 1 to 3/255 on average, so prompts are not what these comparisons check.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import mlnb
from mlnb.device import CpuDevice, use_device
from mlnb.levels import OptimizationLevel

FAST = dict(steps=2, width=64, height=64)
MAX_DIFF, MEAN_DIFF = 12, 2.0  # out of 255; see the module docstring
KINDS = ("sd3", "flux")


@pytest.fixture(autouse=True)
def cpu(clean_cache):
    """Every test here runs on the CPU device (also on a GPU machine) with an empty pipeline cache."""
    with use_device(CpuDevice()) as device:
        yield device


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(np.int16)


@pytest.fixture(scope="module")
def level_none_images(request):
    """Level ``none``'s image (seed 3) per kind, made once for the module."""
    images = {}
    with use_device(CpuDevice()):
        for kind in KINDS:
            managed = mlnb.load_pipeline(request.getfixturevalue(f"tiny_{kind}"), level="none")
            images[kind] = _pixels(managed.generate("a watercolor fox", seed=3, **FAST))
            managed.unload()
    return images


@pytest.mark.parametrize("kind", KINDS)
def test_the_folders_are_diffusers_pipelines_with_transformer_denoisers(request, kind):
    """Saved as safetensors only; loaded by the real ``DiffusionPipeline.from_pretrained`` with the layout of the
    real models; level none gives exactly plain diffusers' image."""
    import torch
    from diffusers import DiffusionPipeline

    folder = request.getfixturevalue(f"tiny_{kind}")
    assert list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[kind]
    assert getattr(pipe, "unet", None) is None and pipe.vae.config.latent_channels == 16
    t5 = pipe.text_encoder_3 if kind == "sd3" else pipe.text_encoder_2
    t5_tokenizer = pipe.tokenizer_3 if kind == "sd3" else pipe.tokenizer_2
    assert type(t5).__name__ == "T5EncoderModel"
    ids = t5_tokenizer("A watercolor fox, 7 tails!").input_ids
    assert ids[-1] == t5_tokenizer.eos_token_id and t5_tokenizer.unk_token_id not in ids
    if kind == "sd3":
        assert type(pipe.text_encoder).__name__ == type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert pipe.transformer.config.dual_attention_layers == [0] and pipe.transformer.config.qk_norm == "rms_norm"
    else:
        assert len(pipe.transformer.transformer_blocks) == len(pipe.transformer.single_transformer_blocks) == 2
        assert pipe.transformer.config.guidance_embeds
    pipe.set_progress_bar_config(disable=True)
    plain = pipe("a watercolor fox", num_inference_steps=2, width=64, height=64,
                 generator=torch.Generator().manual_seed(3)).images[0]
    assert plain.size == (64, 64)
    managed = mlnb.load_pipeline(folder, level="none")
    assert np.array_equal(_pixels(managed.generate("a watercolor fox", seed=3, **FAST)), np.asarray(plain))


@pytest.mark.parametrize("level", ["none", "balanced", "aggressive", "ultra"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_level_generates_the_image_of_level_none_within_tolerance(request, level_none_images, kind, level):
    managed = mlnb.load_pipeline(request.getfixturevalue(f"tiny_{kind}"), level=level)
    result = managed.generate("a watercolor fox", seed=3, **FAST)
    assert managed.level is OptimizationLevel(level) and result.level is OptimizationLevel(level)
    assert isinstance(result.images[0], Image.Image) and result.images[0].size == (64, 64)
    assert result.techniques.is_applied("fp8_storage") is (level == "ultra")
    diff = np.abs(_pixels(result) - level_none_images[kind])
    assert diff.max() <= MAX_DIFF and diff.mean() <= MEAN_DIFF, (diff.max(), diff.mean())
    if level == "none":
        assert diff.max() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_image_and_another_seed_another_image(request, kind):
    """At ultra, the level that changes the most (fp8 weights, chunked feed-forward, tiled decode)."""
    managed = mlnb.load_pipeline(request.getfixturevalue(f"tiny_{kind}"), level="ultra")
    first, again, other = (_pixels(managed.generate("a fox", seed=seed, **FAST)) for seed in (5, 5, 6))
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 10 * MEAN_DIFF
