"""LoRAs and image inputs as users reach them: ``load_pipeline(loras=)``, ``ManagedPipeline.set_loras``,
``generate(image=, strength=, mask_image=)`` and ``%%generate --lora/--image/--strength/--mask`` on the tiny SD model
(CPU); every bad input is one line, and the cached pipeline generates again after it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

import mlnb
from mlnb.errors import InvalidArgumentError, ModelLoadError, ModelNotFoundError, UnsafeWeightsError
from mlnb.levels import OptimizationLevel as L
from mlnb.pipeline import ManagedPipeline, cached_pipelines, generate_with_rescue
from mlnb.pipeline.loras import LoraSpec
from mlnb.testing import FakeDevice, FakeOutOfMemoryError, tiny_lora
from fakes import run_cell as run
from fakes import usage_error

pytestmark = pytest.mark.usefixtures("frozen_heap", "clean_cache")

FAST = dict(steps=2, width=64, height=64, seed=0, guidance=1.0)


@pytest.fixture(scope="module")
def loras(tiny_sd, tiny_sdxl, tmp_path_factory):
    """Two LoRAs for the tiny SD model (one in a folder whose name has a space), the first as pickle, and one for
    SDXL (another architecture)."""
    root = tmp_path_factory.mktemp("lora-files")
    return {
        "a": tiny_lora(tiny_sd, root / "a", seed=1),
        "b": tiny_lora(tiny_sd, root / "my loras" / "b", seed=2),
        "pickle": tiny_lora(tiny_sd, root / "pickle", seed=1, pickle=True),
        "xl": tiny_lora(tiny_sdxl, root / "xl", seed=3),
    }


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def picture(size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def half_mask(size=(64, 64)) -> Image.Image:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[:, size[0] // 2:] = 255
    return Image.fromarray(mask)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


# ---------------------------------------------------------------------------------------------------------------
# Python


def test_load_pipeline_applies_loras_to_the_cached_pipeline_and_the_result_records_them(tiny_sd, loras):
    """The LoRAs are the cached pipeline's state, not its key: the same model with LoRAs is the same pipeline."""
    plain = mlnb.load_pipeline(tiny_sd, level="none")
    base = pixels(plain.generate("a fox", **FAST))
    styled = mlnb.load_pipeline(tiny_sd, level="none", loras=[loras["a"], (loras["b"], 0.5)])
    assert styled is plain and len(cached_pipelines()) == 1
    assert [(a.spec.source, a.spec.scale) for a in styled.loras] == [(str(loras["a"]), 1.0), (str(loras["b"]), 0.5)]
    assert all(a.nbytes > 0 for a in styled.loras)
    result = styled.generate("a fox", **FAST)
    assert result.loras == (LoraSpec(str(loras["a"])), LoraSpec(str(loras["b"]), 0.5))
    assert "LoRAs pytorch_lora_weights.safetensors, pytorch_lora_weights.safetensors:0.5" in result.report_line()
    assert not np.array_equal(pixels(result), base)
    assert mlnb.load_pipeline(tiny_sd, level="none").loras == styled.loras  # None: the set stays as it is
    assert styled.set_loras([]) == () and styled.loras == () and styled.lora_specs == ()
    cleared = styled.generate("a fox", **FAST)
    assert np.array_equal(pixels(cleared), base) and cleared.loras == ()
    assert "LoRA" not in cleared.report_line()


def test_a_bad_lora_spec_is_refused_before_anything_loads(tiny_sd):
    with pytest.raises(InvalidArgumentError) as info:
        mlnb.load_pipeline(tiny_sd, level="none", loras=[("fox.safetensors", float("nan"))])
    assert "scale must be a finite number" in one_line(info.value)
    assert cached_pipelines() == []


@pytest.mark.parametrize("which, error, says", [
    ("missing", ModelNotFoundError, "no LoRA file or folder at"),
    ("pickle", UnsafeWeightsError, "is a pickle file"),
    ("xl", ModelLoadError, "does not fit this StableDiffusionPipeline"),
    ("corrupt", ModelLoadError, "could not read LoRA"),
])
def test_a_lora_that_cannot_apply_is_one_line_and_the_pipeline_keeps_its_set(tiny_sd, loras, tmp_path, which,
                                                                            error, says):
    managed = mlnb.load_pipeline(tiny_sd, level="none", loras=[loras["a"]])
    before = pixels(managed.generate("a fox", **FAST))
    bad = {"missing": tmp_path / "nope.safetensors", "corrupt": tmp_path / "bad.safetensors"}.get(which, loras.get(which))
    if which == "corrupt":
        bad.write_bytes(b"not a safetensors file")
    with pytest.raises(error) as info:
        managed.set_loras([loras["b"], bad])
    assert says in one_line(info.value)
    assert [a.spec.source for a in managed.loras] == [str(loras["a"])]
    assert np.array_equal(pixels(managed.generate("a fox", **FAST)), before)


def test_a_pickle_lora_applies_with_allow_pickle(tiny_sd, loras):
    managed = mlnb.load_pipeline(tiny_sd, level="none", loras=[loras["a"]])
    safe = pixels(managed.generate("a fox", **FAST))
    managed.set_loras([loras["pickle"]], allow_pickle=True)
    assert np.array_equal(pixels(managed.generate("a fox", **FAST)), safe) and managed.loras_allow_pickle


def test_set_loras_waits_for_a_generation_in_another_thread(tiny_sd, loras):
    managed = mlnb.load_pipeline(tiny_sd, level="none")
    holding, release, done = threading.Event(), threading.Event(), threading.Event()

    def generation():
        with managed.hold():
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=generation)
    thread.start()
    holding.wait(10)
    setter = threading.Thread(target=lambda: (managed.set_loras([loras["a"]]), done.set()))
    setter.start()
    time.sleep(0.2)
    assert not done.is_set() and managed.loras == ()
    release.set()
    thread.join(10)
    setter.join(30)
    assert done.is_set() and len(managed.loras) == 1


def test_img2img_and_inpainting_run_the_derived_pipeline_and_the_result_records_the_inputs(tiny_sd, tmp_path):
    managed = mlnb.load_pipeline(tiny_sd, level="none")
    start = tmp_path / "start.png"
    picture((72, 64)).save(start)
    result = managed.generate("a fox", steps=4, seed=0, image=start, strength=0.5)
    assert result.image.size == (72, 64) and result.params["width"] == 72 and result.task == "img2img"
    assert (result.image_source, result.mask_source, result.strength) == (str(start), None, 0.5)
    assert "img2img from start.png, strength 0.5" in result.report_line()
    again = managed.generate("a fox", steps=4, seed=0, image=start, strength=0.5)
    assert np.array_equal(pixels(again), pixels(result))
    inpainted = managed.generate("a fox", steps=2, seed=0, image=picture(), mask_image=half_mask())
    assert inpainted.task == "inpaint" and inpainted.strength == 1.0 and inpainted.image.size == (64, 64)
    assert "inpaint from a 64×64 PIL image masked by a 64×64 PIL image, strength 1" in inpainted.report_line()
    text = managed.generate("a fox", **FAST)
    assert text.task == "text2img" and text.image_source is None and text.strength is None


@pytest.mark.parametrize("kwargs, says", [
    (dict(image=picture(), width=64), "width: image-to-image makes an image of the start image's size (64×64)"),
    (dict(image=picture(), strength=0.2), "strength 0.2 of 2 steps runs no denoising step"),
    (dict(image=picture(), strength=1.5), "strength must be a finite number in (0, 1]"),
    (dict(image=picture(), mask_image=half_mask((32, 64))), "mask_image is 32×64 but the image is 64×64"),
    (dict(image=Image.new("RGB", (0, 0))), "image: the PIL image has no pixels"),
    (dict(strength=0.5), "strength needs an image to start from"),
])
def test_bad_image_inputs_are_one_line_before_any_work(tiny_sd, kwargs, says):
    managed = mlnb.load_pipeline(tiny_sd, level="none")
    with pytest.raises(InvalidArgumentError) as info:
        managed.generate("a fox", steps=2, seed=0, **kwargs)
    assert says in one_line(info.value)
    assert managed.generate("a fox", **FAST).images


def test_the_oom_rescue_retries_with_the_same_loras_and_image(tiny_sd, loras, monkeypatch):
    """Out of memory at none: the balanced pipeline the rescue loads gets the same LoRAs, and the same image
    inputs run again."""
    fake = FakeDevice()
    managed = mlnb.load_pipeline(tiny_sd, level="none", device=fake, loras=[(loras["a"], 0.7)])
    original = ManagedPipeline.run
    tried = []

    def run(self, *args, **kwargs):
        tried.append(self.level)
        if len(tried) == 1:
            raise FakeOutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ManagedPipeline, "run", run)
    result = generate_with_rescue(managed, prompt="a fox", steps=4, seed=0, image=picture(), strength=0.5)
    assert tried == [L.NONE, L.BALANCED] and result.rescued_from is L.NONE
    assert result.loras == (LoraSpec(str(loras["a"]), 0.7),) and result.strength == 0.5
    assert [a.spec for a in cached_pipelines()[0].loras] == [LoraSpec(str(loras["a"]), 0.7)]


# ---------------------------------------------------------------------------------------------------------------
# The magic


def cell(model, extra: str = "") -> str:
    return f"%%generate --model {model} --steps 2 --width 64 --height 64 --seed 0 --guidance 1 --quiet --out r {extra}\na fox"


@pytest.mark.usefixtures("fresh_defaults")
def test_a_cell_generates_with_exactly_the_loras_it_names(ip, tiny_sd, loras):
    """--lora is repeatable, takes PATH:SCALE and a quoted path with spaces; a cell without --lora has none."""
    assert run(ip, cell(tiny_sd)).success
    base = pixels(ip.user_ns["r"])
    b_folder = loras["b"].parent
    assert " " in str(b_folder)
    assert run(ip, cell(tiny_sd, f'--lora {loras["a"]}:0.8 --lora "{b_folder}"')).success
    result = ip.user_ns["r"]
    assert result.loras == (LoraSpec(str(loras["a"]), 0.8), LoraSpec(str(b_folder)))
    assert not np.array_equal(pixels(result), base)
    assert run(ip, cell(tiny_sd)).success
    assert ip.user_ns["r"].loras == () and np.array_equal(pixels(ip.user_ns["r"]), base)
    assert len(cached_pipelines()) == 1


@pytest.mark.usefixtures("fresh_defaults")
def test_image_and_mask_come_from_a_file_or_a_notebook_variable(ip, tiny_sd, tmp_path):
    path = tmp_path / "start.png"
    picture().save(path)
    ip.user_ns["start"], ip.user_ns["mask"] = picture(), half_mask()
    source = cell(tiny_sd, "").replace("--width 64 --height 64 ", "").replace("--steps 2", "--steps 4")
    assert run(ip, source + "").success  # text to image first (native size)
    assert run(ip, source.replace("--quiet", f"--quiet --image {path} --strength 0.5")).success
    result = ip.user_ns["r"]
    assert (result.task, result.image_source, result.strength) == ("img2img", str(path), 0.5)
    assert run(ip, source.replace("--quiet", "--quiet --image start --mask mask")).success
    result = ip.user_ns["r"]
    assert (result.task, result.image_source, result.mask_source) == (
        "inpaint", "a 64×64 PIL image", "a 64×64 PIL image")


@pytest.mark.usefixtures("fresh_defaults")
@pytest.mark.parametrize("case, says", [
    ("missing-lora", "no LoRA file or folder at"),
    ("corrupt-lora", "could not read LoRA"),
    ("pickle-lora", "is a pickle file"),
    ("other-architecture", "does not fit this StableDiffusionPipeline"),
    ("nan-scale", "scale must be a finite number"),
    ("image-does-not-open", "--image: "),
    ("image-no-variable", "--image: 'nowhere' is neither an image file nor a notebook variable"),
    ("image-no-pixels", "--image: the PIL image has no pixels"),
    ("mask-size", "--mask is 32×64 but the image is 64×64"),
    ("strength-zero", "--strength must be a finite number in (0, 1]"),
    ("strength-above-one", "--strength must be a finite number in (0, 1]"),
    ("strength-nan", "--strength must be a finite number in (0, 1]"),
    ("strength-alone", "--strength needs an image to start from"),
])
def test_every_bad_input_is_one_line_and_the_next_cell_generates(ip, tiny_sd, loras, tmp_path, capsys, case, says):
    assert run(ip, cell(tiny_sd, f"--lora {loras['a']}")).success
    managed = cached_pipelines()[0]
    corrupt, broken = tmp_path / "corrupt.safetensors", tmp_path / "broken.png"
    corrupt.write_bytes(b"\0" * 16)
    broken.write_bytes(b"not a png")
    ip.user_ns.update(empty=Image.new("RGB", (0, 0)), start=picture(), narrow=half_mask((32, 64)))
    options = {
        "missing-lora": f"--lora {tmp_path / 'nope.safetensors'}",
        "corrupt-lora": f"--lora {corrupt}",
        "pickle-lora": f"--lora {loras['pickle']}",
        "other-architecture": f"--lora {loras['xl']}",
        "nan-scale": f"--lora {loras['a']}:nan",
        "image-does-not-open": f"--image {broken}",
        "image-no-variable": "--image nowhere",
        "image-no-pixels": "--image empty",
        "mask-size": "--image start --mask narrow",
        "strength-zero": "--image start --strength 0",
        "strength-above-one": "--image start --strength 1.5",
        "strength-nan": "--image start --strength nan",
        "strength-alone": "--strength 0.5",
    }[case]
    text = usage_error(ip, cell(tiny_sd, options).replace("--width 64 --height 64 ", ""), capsys)
    assert says in text, text
    assert managed.loaded and cached_pipelines() == [managed]
    assert [a.spec.source for a in managed.loras] == [str(loras["a"])]  # a refused cell changed nothing
    assert run(ip, cell(tiny_sd)).success and ip.user_ns["r"].images


# ---------------------------------------------------------------------------------------------------------------
# What %vram and the dashboard show


def test_vram_status_and_the_dashboard_list_the_active_loras_with_their_bytes(ip, tiny_sd, loras):
    from mlnb.device import CpuDevice
    from mlnb.session import status
    from mlnb.units import format_bytes
    from mlnb.widgets.state import gauge_state

    managed = mlnb.load_pipeline(tiny_sd, level="none", loras=[(loras["a"], 0.5)])
    nbytes = managed.loras[0].nbytes
    (row,) = status().pipelines[0].loras
    assert (row.source, row.scale, row.nbytes) == (str(loras["a"]), 0.5, nbytes)
    text = str(ip.run_line_magic("vram", ""))
    (line,) = [line for line in text.splitlines() if line.startswith("  LoRA ")]
    assert line.endswith(f"{loras['a']} at 0.5, {format_bytes(nbytes)}")
    state = gauge_state(CpuDevice().info(), pipelines=[(managed.model, "none")],
                        loras=[(str(loras["a"]), 0.5, 61440)])
    assert state.loras == "pytorch_lora_weights.safetensors:0.5 (60.0 KiB)" and "LoRAs: " in str(state)
    assert gauge_state(CpuDevice().info()).loras == "none"
    pytest.importorskip("ipywidgets")
    board = mlnb.dashboard(start=False)
    try:
        assert "LoRAs: pytorch_lora_weights.safetensors:0.5 (" in board.level_info.value
        managed.set_loras([])
        board.refresh()
        assert "LoRAs: none" in board.level_info.value
    finally:
        board.close()


# ---------------------------------------------------------------------------------------------------------------
# Under a budget plan


def test_a_planned_pipeline_with_a_lora_gives_the_unplanned_image_with_it_and_counts_its_bytes(
        tiny_sdxl, loras, tmp_path, monkeypatch):
    """The plan path on the CPU (a CUDA-like fake device): the streamer comes off while the adapters change and
    streams the same blocks again with their adapters; the image is the unplanned pipeline's with the same LoRA,
    and the plan's facts count the adapters' bytes."""
    import torch
    from diffusers import DiffusionPipeline

    from fakes import tiny_stream_budget
    from mlnb.planner import streamer_of

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    budget = tiny_stream_budget(DiffusionPipeline.from_pretrained(tiny_sdxl, torch_dtype=torch.float16), monkeypatch)
    device = FakeDevice(cuda_like=True)
    call = dict(steps=2, width=64, height=64, seed=1)
    plain = mlnb.load_pipeline(tiny_sdxl, level="none", device=device, loras=[loras["xl"]])
    reference = pixels(plain.generate("a fox", **call))
    plain.unload()
    planned = mlnb.load_pipeline(tiny_sdxl, budget=budget, device=device)
    assert planned.plan.streamed and streamer_of(planned.pipe) is not None
    base_total = planned.plan_facts.total
    base = pixels(planned.generate("a fox", **call))
    planned.set_loras([loras["xl"]])
    assert streamer_of(planned.pipe) is not None
    assert planned.plan_facts.total == base_total + planned.loras[0].nbytes
    assert np.abs(pixels(planned.generate("a fox", **call)) - reference).max() <= 2
    planned.set_loras([])
    assert planned.plan_facts.total == base_total
    assert np.array_equal(pixels(planned.generate("a fox", **call)), base)
