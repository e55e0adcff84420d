"""Image inputs for image-to-image and inpainting, checked in one line each, and the pipelines for both made from the
loaded tiny pipelines' own components (no weight copied), generating through diffusers on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mlnb.errors import InvalidArgumentError
from mlnb.pipeline.images import ImageTask, check_strength, image_inputs, load_image, pipeline_for

pytestmark = pytest.mark.usefixtures("frozen_heap")


def load(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(size=(64, 64), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def half_mask(size=(64, 64)) -> Image.Image:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[:, size[0] // 2:] = 255  # repaint the right half
    return Image.fromarray(mask, "L")


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text and text
    return text


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def test_an_image_opens_from_a_path_or_a_pil_image_as_rgb_and_a_mask_as_l(tmp_path):
    path = tmp_path / "fox.png"
    picture(mode="RGBA").save(path)
    for value in (path, str(path), picture(mode="RGBA"), picture().convert("L")):
        image = load_image(value)
        assert image.mode == "RGB" and image.size == (64, 64)
    assert load_image(path, "mask_image", mode="L").mode == "L"
    rgb = picture()
    assert load_image(rgb) is rgb  # nothing converted, nothing copied


@pytest.mark.parametrize("case, says", [
    ("missing", "image: no image file at"),
    ("text", "does not open as an image (cannot identify image file"),
    ("truncated", "does not open as an image"),
    ("empty", "image: the PIL image has no pixels (0×0)"),
    ("number", "image must be a path or a PIL image, got int"),
])
def test_an_image_that_does_not_open_or_has_no_pixels_is_one_line(tmp_path, case, says):
    values = {
        "missing": tmp_path / "nope.png",
        "text": tmp_path / "notes.png",
        "truncated": tmp_path / "cut.png",
        "empty": Image.new("RGB", (0, 0)),
        "number": 7,
    }
    (tmp_path / "notes.png").write_text("not an image")
    picture().save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:200])
    with pytest.raises(InvalidArgumentError) as info:
        load_image(values[case])
    assert says in one_line(info)


@pytest.mark.parametrize("strength", [0, -0.1, 1.0001, 2, float("nan"), float("inf"), True, "0.5", None])
def test_a_strength_outside_zero_to_one_or_not_a_finite_number_is_refused(strength):
    with pytest.raises(InvalidArgumentError) as info:
        check_strength(strength)
    assert "strength must be a" in one_line(info) and "(0, 1]" in str(info.value)


@pytest.mark.parametrize("strength", [1, 0.5, 1e-3, np.float32(0.25)])
def test_a_strength_in_zero_to_one_is_a_float(strength):
    assert check_strength(strength) == pytest.approx(float(strength)) and type(check_strength(strength)) is float


def test_the_inputs_are_checked_together(tmp_path):
    assert image_inputs() is None
    inputs = image_inputs(picture(), strength=0.6)
    assert inputs.task is ImageTask.IMAGE_TO_IMAGE and inputs.call_kwargs().keys() == {"image", "strength"}
    assert inputs.image_source == "a 64×64 PIL image" and inputs.mask_source is None
    path = tmp_path / "mask.png"
    half_mask().save(path)
    inputs = image_inputs(picture(), mask_image=path)
    assert inputs.task is ImageTask.INPAINT and inputs.mask.mode == "L" and inputs.mask_source == str(path)
    assert inputs.call_kwargs().keys() == {"image", "mask_image"}  # the pipeline's default strength
    with pytest.raises(InvalidArgumentError) as info:
        image_inputs(picture((64, 64)), mask_image=half_mask((32, 64)))
    assert one_line(info) == "mask_image is 32×64 but the image is 64×64: give a mask of the image's size"
    for kwargs, says in (({"strength": 0.5}, "strength needs"), ({"mask_image": half_mask()}, "mask_image needs")):
        with pytest.raises(InvalidArgumentError, match=says):
            image_inputs(**kwargs)
    with pytest.raises(InvalidArgumentError, match="mask_image: no image file"):
        image_inputs(picture(), mask_image=tmp_path / "nope.png")


# ---------------------------------------------------------------------------------------------------------------
# The derived pipelines


@pytest.mark.parametrize("kind, classes", [
    ("sd", ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")),
    ("sdxl", ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")),
])
def test_the_img2img_and_inpaint_pipelines_share_every_weight_of_the_loaded_one(request, kind, classes):
    pipe = load(request.getfixturevalue(f"tiny_{kind}"))
    tensors = {
        (name, key): (t, t.data_ptr())
        for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)
        for key, t in c.state_dict(keep_vars=True).items()
    }
    assert pipeline_for(pipe, "text2img") is pipe
    for task, class_name in zip((ImageTask.IMAGE_TO_IMAGE, ImageTask.INPAINT), classes):
        derived = pipeline_for(pipe, task)
        assert type(derived).__name__ == class_name
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                assert derived.components[name] is component, name
                for key, t in component.state_dict(keep_vars=True).items():
                    assert (t, t.data_ptr()) == tensors[(name, key)], (name, key)
        assert derived._progress_bar_config == pipe._progress_bar_config


def test_an_fp16_pipeline_s_derived_pipeline_stays_fp16(tiny_sd):
    """The pipeline classes' own from_pipe casts to fp32 unless told, copying every weight; the auto pipelines'
    does not."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_sd, torch_dtype=torch.float16)
    weight = pipe.unet.conv_in.weight
    derived = pipeline_for(pipe, "img2img")
    assert derived.unet.conv_in.weight is weight and weight.dtype == torch.float16


def generate(pipe, inputs: object, seed: int = 0) -> np.ndarray:
    kwargs = inputs.call_kwargs()
    out = pipeline_for(pipe, inputs.task)("a fox", num_inference_steps=2, guidance_scale=1.0, output_type="np",
                                          generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    return out.images[0]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_img2img_and_inpainting_generate_on_the_tiny_models_through_diffusers(request, kind, tmp_path):
    pipe = load(request.getfixturevalue(f"tiny_{kind}"))
    start = tmp_path / "start.png"
    picture().save(start)
    light = generate(pipe, image_inputs(start, strength=0.5))
    strong = generate(pipe, image_inputs(start, strength=1.0))
    assert light.shape == strong.shape == (64, 64, 3)
    assert np.abs(light - strong).max() > 0.01  # the strength is used
    assert np.array_equal(generate(pipe, image_inputs(start, strength=0.5)), light)  # and the seed
    painted = generate(pipe, image_inputs(start, strength=1.0, mask_image=half_mask()))
    assert painted.shape == (64, 64, 3) and np.isfinite(painted).all()
    assert np.abs(painted - strong).max() > 0.01


def test_a_lora_applied_to_the_loaded_pipeline_applies_to_its_img2img_pipeline(tiny_sd, tmp_path):
    from mlnb.pipeline.adapters import set_loras
    from mlnb.testing import tiny_lora

    pipe = load(tiny_sd)
    inputs = image_inputs(picture(), strength=0.7)
    base = generate(pipe, inputs)
    set_loras(pipe, [tiny_lora(tiny_sd, tmp_path / "lora", seed=1)])
    assert np.abs(generate(pipe, inputs) - base).max() > 0.01
    set_loras(pipe, [])
    assert np.array_equal(generate(pipe, inputs), base)
