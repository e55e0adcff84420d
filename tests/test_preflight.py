"""What a request and a model folder are checked for before any work, and what the cache hands out, typed as a user
types them in a real IPython shell, from Python, and in the dashboard: a damaged model folder is one line naming the
file; a size, batch, step count or guidance the device or the scheduler cannot run is one line before anything is
allocated; the cache never serves a pipeline for another device, changed weights, or a pipeline no longer whole, and
an unload asked for from inside a generation waits for it. Runs on both stacks (IPython 9 and 7.34)."""

from __future__ import annotations

import html
import shutil

import pytest

import mlnb
from mlnb.errors import ModelLoadError

pytestmark = pytest.mark.usefixtures("fresh_defaults", "clean_cache")

FAST = "--steps 1 --width 64 --height 64 --seed 1"
DAMAGED = "save the pipeline again (pipe.save_pretrained) or download it again"


def run(ip, source: str):
    return ip.run_cell(source, store_history=True)


def one_line(ip, source: str, capsys) -> str:
    """Run a cell that must fail with a UsageError shown as exactly one line, no traceback; return the line. What a
    carriage return overwrote (a progress bar opened and cleared) is not shown, as a terminal or a notebook shows it."""
    from IPython.core.error import UsageError

    capsys.readouterr()
    result = run(ip, source)
    assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
    captured = capsys.readouterr()
    text = "\n".join(line.rsplit("\r", 1)[-1] for line in (captured.out + captured.err).split("\n")).strip()
    assert "Traceback" not in text and text.count("\n") == 0 and text.startswith("UsageError: "), text
    return text


@pytest.fixture
def board(fresh_defaults):
    """A dashboard without its updater thread, closed afterwards."""
    pytest.importorskip("ipywidgets")
    made = mlnb.dashboard(start=False)
    yield made
    made.close()


# ----------------------------------------------------------------------------------------------------------------
# A damaged model folder is one line naming the file

_BROKEN = {  # case: (file, bytes written, what the line says of it)
    "index-not-json": ("model_index.json", b"{bad", "is not valid JSON (Expecting property name enclosed in double "
                                                    "quotes: line 1 column 2 (char 1))"),
    "index-not-object": ("model_index.json", b"[1, 2]", "is not a JSON object (it holds an array)"),
    "index-not-utf8": ("model_index.json", b'{"a": "\xff"}', "is not UTF-8 text (byte 0xff at position 7)"),
    "config-not-json": ("unet/config.json", b"{bad", "is not valid JSON (Expecting property name enclosed in double "
                                                     "quotes: line 1 column 2 (char 1))"),
    "config-not-object": ("vae/config.json", b'"text"', "is not a JSON object (it holds a string)"),
    "config-not-utf8": ("text_encoder/config.json", b"\xfe{}", "is not UTF-8 text (byte 0xfe at position 0)"),
    "scheduler-not-json": ("scheduler/scheduler_config.json", b"", "is not valid JSON (Expecting value: line 1 "
                                                                   "column 1 (char 0))"),
}


def _broken_model(tiny_sd, tmp_path, case: str):
    """A copy of the tiny SD pipeline, in a folder whose path has a space, damaged as ``case`` says; returns the
    folder and the line that names what is wrong."""
    folder = tmp_path / "my models" / case
    shutil.copytree(tiny_sd, folder)
    if case == "missing-component":
        shutil.rmtree(folder / "vae")
        return folder, (f"{str(folder / 'vae')!r} is missing: {str(folder / 'model_index.json')!r} names the "
                        f"component 'vae'; {DAMAGED}")
    name, content, says = _BROKEN[case]
    (folder / name).write_bytes(content)
    return folder, f"{str(folder / name)!r} {says}; {DAMAGED}"


CASES = sorted(_BROKEN) + ["missing-component"]


@pytest.mark.parametrize("case", CASES)
def test_a_damaged_model_folder_is_one_line_naming_the_file_in_a_magic(ip, tiny_sd, tmp_path, capsys, case):
    folder, line = _broken_model(tiny_sd, tmp_path, case)
    assert one_line(ip, f"%%generate --model '{folder}' {FAST}\na fox", capsys) == f"UsageError: {line}"
    assert mlnb.pipeline.cached_pipelines() == [] and mlnb.session.defaults.model is None
    assert run(ip, "1 + 1").success  # the next cell runs


@pytest.mark.parametrize("case", CASES)
def test_a_damaged_model_folder_is_one_line_naming_the_file_from_python(tiny_sd, tmp_path, case):
    folder, line = _broken_model(tiny_sd, tmp_path, case)
    with pytest.raises(ModelLoadError) as info:
        mlnb.load_pipeline(folder)
    assert str(info.value) == line and info.value.__cause__ is None


@pytest.mark.parametrize("case", ["index-not-json", "config-not-object", "missing-component"])
def test_a_damaged_model_folder_is_one_line_naming_the_file_in_the_dashboard(board, tiny_sd, tmp_path, case):
    folder, line = _broken_model(tiny_sd, tmp_path, case)
    panel = board.generate_panel
    board.model.value = str(folder)  # typed into the model field
    panel.prompt.value = "a fox"
    panel.steps.value, panel.seed.value, panel.width.value, panel.height.value = 1, "1", "64", "64"
    panel.button.click()
    assert panel.wait(timeout=60)
    assert panel.error == line
    assert html.escape(line) in panel.status.value and not panel.button.disabled


def test_a_component_passed_as_an_object_needs_no_folder(tiny_sd, tmp_path):
    from diffusers import AutoencoderKL

    folder, _ = _broken_model(tiny_sd, tmp_path, "missing-component")
    vae = AutoencoderKL.from_pretrained(tiny_sd / "vae")
    assert mlnb.load_pipeline(folder, level="none", vae=vae).pipe.vae is vae


# ----------------------------------------------------------------------------------------------------------------
# The preflight: refused in one line before any work


@pytest.fixture
def no_denoising(monkeypatch):
    """Fails the test if a pipeline's denoiser runs (a refused request runs nothing)."""
    from diffusers import UNet2DConditionModel

    def refused(*args, **kwargs):
        pytest.fail("a refused request ran the denoiser")

    monkeypatch.setattr(UNet2DConditionModel, "forward", refused)


@pytest.fixture
def host_ram(monkeypatch):
    """Set the host RAM available now, as the preflight reads it."""
    import mlnb.device

    def set_available(nbytes: int) -> None:
        monkeypatch.setattr(mlnb.device, "host_memory", lambda: (64 * 2**30, nbytes))

    return set_available


def test_a_size_and_batch_the_cpu_cannot_hold_is_one_line_with_what_fits(ip, tiny_sd, capsys):
    assert run(ip, f"%%generate --model {tiny_sd} {FAST} --quiet\na fox").success  # loaded and cached
    last = mlnb.last_result()
    text = one_line(ip, f"%%generate --model {tiny_sd} --steps 1 --width 4096 --height 4096 --num-images 16\na fox",
                    capsys)
    assert text.startswith("UsageError: 4096×4096 ×16 needs about 1305.6 GiB of host RAM for one denoising step or "
                           "the decode, and "), text
    assert " is available; the largest that fits: " in text and "with 16 images" in text
    assert mlnb.last_result() is last and run(ip, "1 + 1").success


def test_the_preflight_names_the_largest_batch_and_size_that_fit(tiny_sd, host_ram, no_denoising):
    from mlnb.errors import InvalidArgumentError

    managed = mlnb.load_pipeline(tiny_sd, level="none")
    host_ram(24 * 2**30)
    with pytest.raises(InvalidArgumentError) as info:
        managed.generate("a fox", steps=1, width=2048, height=2048, num_images=4)
    assert str(info.value) == (
        "2048×2048 ×4 needs about 81.6 GiB of host RAM for one denoising step or the decode, and 24.0 GiB is "
        "available; the largest that fits: 1 image at 2048×2048, or 1104×1104 with 4 images")
    host_ram(512 * 2**20)
    with pytest.raises(InvalidArgumentError, match=r"^64×64 ×1 needs about 1\.0 GiB .*not even 8×8 fits"):
        managed.generate("a fox", steps=1, width=64, height=64)


def test_a_size_no_level_fits_on_the_card_is_refused_before_the_gpu_is_touched(tiny_sd, no_denoising):
    from mlnb.errors import InvalidArgumentError
    from mlnb.testing import FakeDevice
    from mlnb.units import GiB

    fake = FakeDevice(total=4 * GiB)
    managed = mlnb.load_pipeline(tiny_sd, level="ultra", device=fake)
    with pytest.raises(InvalidArgumentError) as info:
        managed.generate("a fox", steps=1, width=4096, height=4096, num_images=16)
    assert str(info.value) == (
        "4096×4096 ×16 needs about 389.1 GiB of GPU memory for one denoising step, and the Fake GPU has 4.0 GiB in "
        "all; the largest that fits: 408×408 with 16 images")
    assert fake.peak_allocated == 0


def test_the_dashboard_shows_the_preflight_s_line(board, tiny_sd, host_ram):
    host_ram(8 * 2**30)
    mlnb.session.defaults.model = str(tiny_sd)
    panel = board.generate_panel
    panel.prompt.value = "a fox"
    panel.steps.value, panel.seed.value, panel.width.value, panel.height.value = 1, "1", "2048", "2048"
    panel.button.click()
    assert panel.wait(timeout=60)
    line = ("2048×2048 ×1 needs about 20.4 GiB of host RAM for one denoising step or the decode, and 8.0 GiB is "
            "available; the largest that fits: 1280×1280 with 1 image")
    assert panel.error == line and html.escape(line) in panel.status.value


@pytest.mark.parametrize("steps", ["1001", "1000000000"])
def test_more_steps_than_the_scheduler_has_are_one_line(ip, tiny_sd, capsys, no_denoising, steps):
    text = one_line(ip, f"%%generate --model {tiny_sd} --steps {steps} --width 64 --height 64\na fox", capsys)
    assert text == (f"UsageError: steps must be at most 1000: the scheduler (EulerDiscreteScheduler) has 1000 "
                    f"training steps, got {steps}")


def test_the_steps_bound_is_the_scheduler_s_own(tiny_sd):
    from mlnb.errors import InvalidArgumentError

    managed = mlnb.load_pipeline(tiny_sd, level="none")
    managed.pipe.scheduler.register_to_config(num_train_timesteps=3)
    with pytest.raises(InvalidArgumentError, match="^steps must be at most 3: .* got 4$"):
        managed.generate("a fox", steps=4, width=64, height=64)
    assert managed.generate("a fox", steps=3, width=64, height=64, seed=1).params["steps"] == 3


def test_a_guidance_infinite_in_the_compute_dtype_is_one_line(ip, tiny_sd, capsys, no_denoising):
    text = one_line(ip, f"%%generate --model {tiny_sd} {FAST} --guidance 1e39\na fox", capsys)
    assert text == ("UsageError: guidance must be at most 3.403e+38, the largest fp32 number (the pipeline computes "
                    "in fp32), got 1e+39")


def test_a_guidance_is_bounded_by_the_pipeline_s_own_dtype(tiny_sd, no_denoising):
    from mlnb.errors import InvalidArgumentError

    managed = mlnb.load_pipeline(tiny_sd, level="none", dtype="fp16")
    with pytest.raises(InvalidArgumentError, match=r"^guidance must be at most 6\.55e\+04, the largest fp16 number"):
        managed.generate("a fox", steps=1, width=64, height=64, guidance=70000.0)


# ----------------------------------------------------------------------------------------------------------------
# The cache serves only what was loaded


@pytest.fixture
def own_model(tiny_sd, tmp_path):
    """A copy of the tiny SD pipeline the test may change on disk."""
    folder = tmp_path / "my models" / "tiny sd"
    shutil.copytree(tiny_sd, folder)
    return folder


def test_a_pipeline_loaded_for_one_device_is_not_returned_for_another(tiny_sd, caplog):
    from mlnb.device import CpuDevice
    from mlnb.testing import FakeDevice

    on_cpu = mlnb.load_pipeline(tiny_sd, level="none")
    fake = FakeDevice()
    on_fake = mlnb.load_pipeline(tiny_sd, level="none", device=fake)
    assert on_fake is not on_cpu and on_fake.device is fake
    assert f"unloading {tiny_sd} (none, on CPU (no CUDA device)) to load it again as none, on Fake GPU" in caplog.text
    assert mlnb.load_pipeline(tiny_sd, level="none", device=fake) is on_fake  # the same device: the cached one
    assert mlnb.load_pipeline(tiny_sd, level="none", device=CpuDevice()) is not on_fake
    auto = mlnb.load_pipeline(tiny_sd)
    assert auto.device.kind == "cpu" and mlnb.load_pipeline(tiny_sd, device=fake) is not auto


def test_weights_changed_on_disk_are_loaded_again_with_a_notice(ip, own_model, caplog):
    from diffusers import UNet2DConditionModel

    cell = f"%%generate --model '{own_model}' {FAST} --quiet --out r\na fox"
    assert run(ip, cell).success
    before, first = ip.user_ns["r"], mlnb.pipeline.cached_pipelines()[0]
    assert run(ip, cell).success and mlnb.pipeline.cached_pipelines() == [first]  # unchanged: the cached one
    unet = UNet2DConditionModel.from_pretrained(own_model / "unet")
    for parameter in unet.parameters():
        parameter.data.mul_(1.5)
    unet.save_pretrained(own_model / "unet")  # the same sizes: the modification time tells
    caplog.clear()
    assert run(ip, cell).success
    assert f"weights of {str(own_model)!r} changed on disk since it was loaded: loading it again" in caplog.messages
    after = ip.user_ns["r"]
    assert after.images[0].tobytes() != before.images[0].tobytes()
    assert not first.loaded and mlnb.pipeline.cached_pipelines()[0] is not first


def test_a_pipeline_no_longer_whole_is_loaded_again(ip, own_model, caplog):
    run(ip, f"import mlnb\nfrom pathlib import Path\npipe = mlnb.load_pipeline(Path({str(own_model)!r}), level='none')")
    assert run(ip, "pipe.pipe.unet = None").success  # the user drops a component
    caplog.clear()
    assert run(ip, f"%%generate --model '{own_model}' --level none {FAST} --quiet --out r\na fox").success
    assert f"{str(own_model)!r} is no longer whole (its unet is None): loading it again" in caplog.messages
    assert ip.user_ns["r"].images and not ip.user_ns["pipe"].loaded
    assert run(ip, "again = mlnb.load_pipeline(Path(pipe.model), level='none')\nagain.pipe = None").success
    assert run(ip, "fresh = mlnb.load_pipeline(Path(pipe.model), level='none')").success  # the advice works
    assert ip.user_ns["fresh"] is not ip.user_ns["again"] and ip.user_ns["fresh"].loaded
    assert mlnb.pipeline.cached_pipelines() == [ip.user_ns["fresh"]]


def test_a_safety_checker_set_to_none_keeps_the_pipeline_cached(tiny_sd):
    managed = mlnb.load_pipeline(tiny_sd, level="none")
    managed.pipe.safety_checker = None  # optional: what users commonly drop
    assert mlnb.load_pipeline(tiny_sd, level="none") is managed


@pytest.mark.parametrize("asks", ["mlnb.unload_all()", "get_ipython().run_line_magic('vram', 'free')"])
def test_an_unload_asked_for_inside_its_own_generation_runs_when_it_ends(ip, tiny_sd, caplog, asks):
    cell = (f"import mlnb\npipe = mlnb.load_pipeline({str(tiny_sd)!r}, level='none')\n"
            "def unload_now(p, i, t, kw):\n"
            f"    {asks}\n"
            "    return kw\n"
            "r = pipe.generate('a fox', steps=2, width=64, height=64, seed=1, callback_on_step_end=unload_now)")
    caplog.clear()
    assert run(ip, cell).success
    said = [line for line in caplog.messages if "generating in this thread" in line]
    assert said == [f"{tiny_sd} is generating in this thread: it is unloaded when the generation ends"]
    assert len(ip.user_ns["r"].images) == 1 and not ip.user_ns["pipe"].loaded
    assert mlnb.pipeline.cached_pipelines() == []
