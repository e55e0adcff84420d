"""load_pipeline and ManagedPipeline.generate on tiny real pipelines (CPU): levels, determinism, the result object,
the cache, safe loading with one-line errors, argument checks, Ctrl-C, and the out-of-memory rescue."""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import re
import shutil
import time
import weakref

import numpy as np
import pytest
from PIL import Image

import mlnb
from mlnb.device import CpuDevice, use_device
from mlnb.errors import (
    GenerationInterrupted,
    InvalidArgumentError,
    ModelLoadError,
    ModelNotFoundError,
    OfflineError,
    OutOfMemoryRescueError,
    UnsafeWeightsError,
)
from mlnb.levels import OptimizationLevel
from mlnb.monitor import MemoryReport
from mlnb.optimizer import OptimizationReport
from mlnb.pipeline import GenerationResult, ManagedPipeline, cached_pipelines, generate_with_rescue, last_result
from mlnb.planner import learning
from mlnb.testing import FakeDevice, FakeOutOfMemoryError

L = OptimizationLevel
FAST = dict(steps=2, width=64, height=64)


pytestmark = pytest.mark.usefixtures("frozen_heap")


@pytest.fixture(autouse=True)
def cpu(clean_cache):
    """Every test here runs on the CPU device (also on a GPU machine) with an empty pipeline cache."""
    with use_device(CpuDevice()) as device:
        yield device


def pixels(result: GenerationResult) -> np.ndarray:
    return np.asarray(result.images[0])


# ---------------------------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("level", ["none", "balanced", "aggressive", "ultra", "auto"])
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_generates_at_every_level(request, kind, level):
    """Each level (and auto, which is none on a CPU) loads, optimizes and returns a PIL image of the asked size."""
    managed = mlnb.load_pipeline(request.getfixturevalue(f"tiny_{kind}"), level=level)
    result = managed.generate("a watercolor fox", seed=3, **FAST)
    expected = L.NONE if level == "auto" else L(level)
    assert managed.level is expected and result.level is expected
    assert managed.choice.auto is (level == "auto")
    assert isinstance(result.images[0], Image.Image)
    assert result.images[0].size == (64, 64)
    assert result.image is result.images[0]
    assert result.seed == 3
    assert result.params == dict(
        prompt="a watercolor fox", negative_prompt=None, steps=2, guidance=result.params["guidance"],
        width=64, height=64, num_images=1,
    )
    assert isinstance(result.params["guidance"], float)  # the pipeline's default, recorded
    assert result.techniques is managed.techniques and len(result.techniques) == 11
    assert last_result() is result


def test_same_seed_same_image_and_different_seed_different_image(tiny_sd):
    """The seed fully determines the image; another seed gives another image."""
    managed = mlnb.load_pipeline(tiny_sd, level="none")
    a = pixels(managed.generate("a fox", seed=11, **FAST))
    b = pixels(managed.generate("a fox", seed=11, **FAST))
    c = pixels(managed.generate("a fox", seed=12, **FAST))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_seed_is_drawn_and_recorded_when_not_given(tiny_sd):
    """Without a seed one is drawn; reusing the recorded seed reproduces the image."""
    managed = mlnb.load_pipeline(tiny_sd, level="none")
    first = managed.generate("a fox", steps=1, width=64, height=64)
    again = managed.generate("a fox", steps=1, width=64, height=64, seed=first.seed)
    assert isinstance(first.seed, int)
    assert np.array_equal(pixels(first), pixels(again))


def _walk(value, path="result"):
    """Yield ``(path, value)`` for every value reachable through dataclasses, dicts and sequences."""
    yield path, value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _walk(getattr(value, f.name), f"{path}.{f.name}")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, f"{path}[{k!r}]")
    elif isinstance(value, (list, tuple, set, frozenset)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")


def test_result_holds_no_tensors_and_carries_a_memory_report(tiny_sd):
    """Keeping a result never pins memory: nothing in it is a torch tensor or module; ``memory`` is a report."""
    import torch

    result = mlnb.load_pipeline(tiny_sd, level="ultra").generate("a fox", seed=1, **FAST)
    seen = list(_walk(result))
    assert len(seen) > 20  # the walk really went through the fields
    for path, value in seen:
        assert not isinstance(value, (torch.Tensor, torch.nn.Module, torch.Generator)), path
    assert isinstance(result.memory, MemoryReport)
    assert result.memory.gpu is False and result.memory.host_peak_rss > 0
    assert isinstance(result.techniques, OptimizationReport)
    assert result.seconds > 0


def test_report_line_format(tiny_sd):
    """The one line after a generation: size, steps, time, memory, level with techniques, freed."""
    result = mlnb.load_pipeline(tiny_sd, level="ultra").generate("a fox", seed=1, **FAST)
    line = result.report_line()
    pattern = (
        r"64×64 · 2 steps · \d+\.\d s · CPU, host RSS peak \d+\.\d [KMG]iB · "
        r"level ultra \(VAE fp32 tiles 64, fp8 storage\) · freed (\d+ B|\d+\.\d [KMG]iB)"
    )
    assert re.fullmatch(pattern, line), line
    assert line in repr(result)
    assert "<img src='data:image/png;base64," in result._repr_html_()


def test_report_line_with_several_images_and_a_gpu_report(tiny_sd, monkeypatch):
    """``×N`` follows the size for several images; a GPU report shows ``peak X / Y GiB``."""
    result = mlnb.load_pipeline(tiny_sd, level="none").generate("a fox", seed=1, num_images=2, steps=1, width=64, height=64)
    assert len(result.images) == 2
    assert result.report_line().startswith("64×64 ×2 · 1 step · ")
    gpu = dataclasses.replace(
        result.memory, gpu=True, peak_allocated=int(3.7 * 2**30), device_total=4 * 2**30, freed=int(3.6 * 2**30)
    )
    line = dataclasses.replace(result, memory=gpu).report_line()
    assert " · peak 3.7 / 4.0 GiB · " in line and line.endswith(" · freed 3.6 GiB")


# ---------------------------------------------------------------------------------------------------------------
# Cache


def test_same_model_dtype_level_returns_the_cached_object(tiny_sd):
    """A second load with the same model, dtype and level is the same object (path spelled differently too)."""
    a = mlnb.load_pipeline(tiny_sd, level="balanced")
    b = mlnb.load_pipeline(str(tiny_sd) + "/", level="balanced")
    assert a is b
    assert cached_pipelines() == [a]
    assert a.key == (str(tiny_sd.resolve()), "fp32", "balanced")


def test_auto_reuses_what_auto_loaded(tiny_sd):
    """``auto`` again returns the pipeline auto chose before."""
    a = mlnb.load_pipeline(tiny_sd)
    assert mlnb.load_pipeline(tiny_sd, level="auto") is a


def test_loading_another_level_unloads_the_old_one(tiny_sd):
    """A small card cannot hold two copies: the other level of the same model is unloaded first; its handle says why
    when used again."""
    old = mlnb.load_pipeline(tiny_sd, level="none")
    new = mlnb.load_pipeline(tiny_sd, level="aggressive")
    assert new is not old
    assert not old.loaded and new.loaded
    assert cached_pipelines() == [new]
    with pytest.raises(InvalidArgumentError, match="was unloaded to load it again as aggressive; load it again with"):
        old.generate("a fox", **FAST)


def test_different_models_are_cached_side_by_side(tiny_sd, tiny_sdxl):
    """Only the same model is replaced; another model stays loaded."""
    sd = mlnb.load_pipeline(tiny_sd, level="none")
    sdxl = mlnb.load_pipeline(tiny_sdxl, level="none")
    assert sd.loaded and sdxl.loaded
    assert set(map(id, cached_pipelines())) == {id(sd), id(sdxl)}


def test_unload_frees_the_pipeline_and_removes_it_from_the_cache(tiny_sd):
    """After ``unload()`` nothing holds the diffusers pipeline, the cache forgets it, cleanup ran, and using it
    again says to reload."""
    fake = FakeDevice()
    managed = mlnb.load_pipeline(tiny_sd, level="none", device=fake)
    managed.generate("a fox", seed=1, steps=1, width=64, height=64)
    ref = weakref.ref(managed.pipe)
    calls = fake.empty_cache_calls
    managed.unload()
    gc.collect()
    assert ref() is None
    assert not managed.loaded
    assert managed not in cached_pipelines()
    assert fake.empty_cache_calls == calls + 1
    with pytest.raises(InvalidArgumentError, match="unloaded"):
        managed.generate("a fox", **FAST)
    assert "unloaded" in repr(managed)


# ---------------------------------------------------------------------------------------------------------------
# Loading: safety and one-line errors


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, text
    return text


def test_pickle_only_weights_are_refused_unless_allowed(tiny_sd_pickle):
    """Pickle-only weights raise UnsafeWeightsError naming ``allow_pickle``; with it they load and generate."""
    with pytest.raises(UnsafeWeightsError) as info:
        mlnb.load_pipeline(tiny_sd_pickle, level="none")
    assert "allow_pickle" in _one_line(info.value)
    assert cached_pipelines() == []
    managed = mlnb.load_pipeline(tiny_sd_pickle, level="none", allow_pickle=True)
    assert isinstance(managed.generate("a fox", seed=1, steps=1, width=64, height=64).images[0], Image.Image)


def test_an_accepted_pickle_load_says_so_in_one_line_instead_of_diffusers_two_per_component(tiny_sd_pickle, caplog):
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    keep = Keep()
    logging.getLogger("diffusers").addHandler(keep)
    try:
        with caplog.at_level(logging.WARNING, logger="mlnb"):
            mlnb.load_pipeline(tiny_sd_pickle, level="none", allow_pickle=True)
    finally:
        logging.getLogger("diffusers").removeHandler(keep)
    assert not [m for m in seen if "unsafe serialization" in m or "An error occurred while trying to fetch" in m], seen
    lines = [r.getMessage() for r in caplog.records if "pickle" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("read pickle weights (allow_pickle): ")
    assert {"unet", "vae"} <= set(lines[0].split(": ", 1)[1].split(", "))


def test_pickle_read_weights_are_not_served_from_the_cache_to_a_call_without_allow_pickle(tiny_sd_pickle, tiny_sd,
                                                                                           caplog):
    """A pipeline read from pickle files with ``allow_pickle=True`` is the cached copy of that model; a later call
    without the opt-in gets the same refusal as a first load would, and the cached copy stays. Safetensors weights
    loaded with the opt-in are served to either call."""
    pickled = mlnb.load_pipeline(tiny_sd_pickle, level="none", allow_pickle=True)
    assert pickled.read_pickle
    assert mlnb.load_pipeline(tiny_sd_pickle, level="none", allow_pickle=True) is pickled
    with pytest.raises(UnsafeWeightsError, match="allow_pickle"):
        mlnb.load_pipeline(tiny_sd_pickle, level="none")
    with pytest.raises(UnsafeWeightsError, match="allow_pickle"):
        mlnb.load_pipeline(tiny_sd_pickle)  # auto reuses what auto loaded: not this one either
    assert pickled.loaded and pickled in cached_pipelines()
    safe = mlnb.load_pipeline(tiny_sd, level="none", allow_pickle=True)
    assert not safe.read_pickle
    assert mlnb.load_pipeline(tiny_sd, level="none") is safe


def test_a_cached_pipeline_answers_only_the_same_from_pretrained_arguments(tiny_sd, caplog):
    """Another variant or revision is other weights: a load that asks for it is not served the cached copy, which
    is replaced (one copy per model) with a warning that names the difference."""
    plain = mlnb.load_pipeline(tiny_sd, level="none")
    with caplog.at_level(logging.WARNING, logger="mlnb"):
        other = mlnb.load_pipeline(tiny_sd, level="none", revision="main")
    assert other is not plain and not plain.loaded
    assert "(none, revision=None) to load it again as none, revision='main'" in caplog.text
    assert mlnb.load_pipeline(tiny_sd, level="none", revision="main") is other


def test_missing_path_is_model_not_found(tmp_path):
    """A path that does not exist is ModelNotFoundError, one line, naming the path."""
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as info:
        mlnb.load_pipeline(missing, level="none")
    assert str(missing) in _one_line(info.value)


def test_folder_without_model_index_is_model_not_found(tmp_path):
    """A folder that is not a diffusers pipeline says that ``model_index.json`` is missing."""
    with pytest.raises(ModelNotFoundError) as info:
        mlnb.load_pipeline(tmp_path, level="none")
    assert "model_index.json" in _one_line(info.value)


def test_corrupt_safetensors_is_a_one_line_load_error(tiny_sd, tmp_path):
    """Garbage in place of the UNet's weights gives ModelLoadError in one line, and nothing is cached."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file()
    weights.write_bytes(b"\x00garbage, not a safetensors header" * 64)
    with pytest.raises(ModelLoadError) as info:
        mlnb.load_pipeline(broken, level="none")
    assert _one_line(info.value).startswith(f"could not load {str(broken)!r}: ")
    assert cached_pipelines() == []


def test_hub_id_without_network_is_an_offline_error(monkeypatch):
    """A hub id that cannot be reached (offline mode here) is OfflineError in one line that says what to do."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineError) as info:
        mlnb.load_pipeline("mlnb-tests/no-such-model", level="none")
    message = _one_line(info.value)
    assert "'mlnb-tests/no-such-model'" in message and "local folder" in message


def test_safetensors_only_and_never_remote_code(tiny_sd, monkeypatch):
    """``from_pretrained`` is asked for safetensors only and never told to trust remote code."""
    from diffusers import DiffusionPipeline

    original = DiffusionPipeline.from_pretrained
    seen: list[dict] = []

    def capture(cls, *args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(capture))
    mlnb.load_pipeline(tiny_sd, level="none")
    assert len(seen) == 1
    assert seen[0]["use_safetensors"] is True
    assert seen[0]["trust_remote_code"] is False


# ---------------------------------------------------------------------------------------------------------------
# Arguments


INVALID = [
    (dict(steps=0), "steps"),
    (dict(width=65), "width"),
    (dict(height=4), "height"),
    (dict(width=8192), "width"),
    (dict(prompt=""), "prompt"),
    (dict(prompt="   "), "prompt"),
    (dict(num_images=0), "num_images"),
    (dict(guidance=-1.0), "guidance"),
    (dict(seed=-1), "seed"),
    (dict(prompt=123), "the prompt must be a string, got int"),
    (dict(prompt=["a", "b"]), "the prompt must be a string, got list"),
    (dict(steps=True), "steps"),          # a bool is not a count
    (dict(steps=2.0), "steps"),
    (dict(num_images=True), "num_images"),
    (dict(seed=True), "seed"),
    (dict(guidance="7"), "guidance"),
    (dict(negative_prompt=123), "negative_prompt must be a string"),
    (dict(progress=5), "progress must be a function"),
    (dict(num_inference_steps=3), "num_inference_steps is set by generate: pass steps= instead"),
    (dict(generator=None), "generator is set by generate: pass seed= instead"),
    (dict(guidance_scale=1.0), "guidance_scale is set by generate: pass guidance= instead"),
    (dict(num_images_per_prompt=3), "num_images_per_prompt is set by generate: pass num_images= instead"),
    (dict(output_type="latent"), "output_type is set by generate (PIL images"),
    (dict(callback_on_step_end=3), "callback_on_step_end must be a function"),
]


def test_invalid_arguments_fail_before_any_work(tiny_sd, monkeypatch):
    """Each bad argument raises InvalidArgumentError naming it, and the pipeline is never called."""
    managed = mlnb.load_pipeline(tiny_sd, level="none")
    called = []
    original = type(managed.pipe).__call__

    @functools.wraps(original)
    def spy(*args, **kwargs):
        called.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(type(managed.pipe), "__call__", spy)
    for bad, fragment in INVALID:
        args = dict(prompt="a fox", steps=2, width=64, height=64)
        args.update(bad)
        with pytest.raises(InvalidArgumentError) as info:
            managed.generate(**args)
        assert fragment in _one_line(info.value), bad
    assert called == []
    managed.generate(prompt="a fox", steps=2, width=64, height=64)  # the valid call does reach the pipeline
    assert called == [1]


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C and out-of-memory


def test_keyboard_interrupt_mid_generation(tiny_sd, monkeypatch):
    """Ctrl-C on the second denoising step becomes GenerationInterrupted; the pipeline stays cached and the next
    generation works."""
    managed = mlnb.load_pipeline(tiny_sd, level="none")
    unet = managed.pipe.unet
    original = unet.forward
    steps: list[int] = []

    def forward(*args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", forward)
    with pytest.raises(GenerationInterrupted) as info:
        managed.generate("a fox", seed=1, steps=3, width=64, height=64)
    assert len(steps) == 2  # stopped at step 2, not after the whole run
    assert "stays loaded" in _one_line(info.value)
    assert managed.loaded and cached_pipelines() == [managed]
    result = managed.generate("a fox", seed=1, **FAST)
    assert isinstance(result.images[0], Image.Image)
    assert len(steps) == 4


@pytest.fixture
def oom_first(monkeypatch):
    """Make a generation (``ManagedPipeline.run``, which ``generate`` and the rescue call) raise the fake OOM for
    the first ``n`` calls; records the levels tried."""
    original = ManagedPipeline.run
    tried: list[OptimizationLevel] = []

    def install(n: int):
        def run(self, *args, **kwargs):
            tried.append(self.level)
            if len(tried) <= n:
                raise FakeOutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(ManagedPipeline, "run", run)
        return tried

    return install


def test_oom_rescue_retries_at_the_next_stronger_level(tiny_sd, oom_first):
    """Out of memory at none: everything is freed and the same request runs again at balanced; the result says
    it was rescued, and the none pipeline is gone."""
    fake = FakeDevice()
    managed = mlnb.load_pipeline(tiny_sd, level="none", device=fake)
    tried = oom_first(1)
    result = generate_with_rescue(managed, prompt="a fox", seed=1, **FAST)
    assert tried == [L.NONE, L.BALANCED]
    assert result.level is L.BALANCED
    assert result.rescued_from is L.NONE
    assert result.notes == ("out of memory at none",)
    assert "after OOM at none" in result.report_line()
    assert last_result() is result
    assert not managed.loaded
    assert [m.level for m in cached_pipelines()] == [L.BALANCED]
    assert fake.empty_cache_calls >= 1


def test_oom_at_ultra_says_what_would_fit(tiny_sd, oom_first):
    """At ultra there is nothing stronger: OutOfMemoryRescueError says so and suggests a size that is smaller."""
    managed = mlnb.load_pipeline(tiny_sd, level="ultra", device=FakeDevice())
    tried = oom_first(99)
    with pytest.raises(OutOfMemoryRescueError) as info:
        generate_with_rescue(managed, prompt="a fox", steps=2, width=512, height=768)
    message = _one_line(info.value)
    assert tried == [L.ULTRA]
    assert "level ultra" in message and "512×768" in message
    assert "--width 384 --height 576" in message
    with pytest.raises(OutOfMemoryRescueError, match="--num-images 2"):
        generate_with_rescue(managed, prompt="a fox", steps=2, width=512, height=512, num_images=4)


def test_oom_again_after_the_retry(tiny_sd, oom_first):
    """If the stronger level also runs out, the error names both levels."""
    managed = mlnb.load_pipeline(tiny_sd, level="aggressive", device=FakeDevice())
    tried = oom_first(2)
    with pytest.raises(OutOfMemoryRescueError) as info:
        generate_with_rescue(managed, prompt="a fox", **FAST)
    assert tried == [L.AGGRESSIVE, L.ULTRA]
    assert "at level aggressive and again at ultra" in _one_line(info.value)


def test_other_errors_are_not_rescued(tiny_sd, monkeypatch):
    """Only out-of-memory is retried; any other error propagates unchanged, with no reload."""
    managed = mlnb.load_pipeline(tiny_sd, level="none", device=FakeDevice())

    def broken(self, *args, **kwargs):
        raise ValueError("scheduler exploded")

    monkeypatch.setattr(ManagedPipeline, "run", broken)
    with pytest.raises(ValueError, match="scheduler exploded"):
        generate_with_rescue(managed, prompt="a fox", **FAST)
    assert cached_pipelines() == [managed]


def test_step_times_are_recorded_only_for_an_unoffloaded_denoiser(tiny_sd, clean_cache):
    """The planner's step time must be compute alone: runs that stream or offload the denoiser do not record one."""
    import mlnb

    none = mlnb.load_pipeline(tiny_sd, level="none")
    assert learning.resident(none.learning_context()) == (True, True)
    none.unload()
    ultra = mlnb.load_pipeline(tiny_sd, level="ultra")
    denoiser, vae = learning.resident(ultra.learning_context())
    # On a CPU nothing is offloaded, so nothing moves: only fp8 storage (if it ran) makes the steps slower.
    assert denoiser is (not ultra.techniques.is_applied("fp8_storage") and not ultra.techniques.is_applied("group_offload"))
    assert vae is False or denoiser


def test_oom_with_a_plan_retries_with_a_safer_plan(tiny_sd, oom_first, clean_cache):
    """A planned pipeline that runs out of memory is retried with a plan for a quarter less budget (more streamed,
    more margin), not at a fixed level; when even that fails the error names both plans."""
    managed = mlnb.load_pipeline(tiny_sd, budget="3GiB", device=FakeDevice())
    oom_first(1)
    result = generate_with_rescue(managed, prompt="a fox", seed=1, **FAST)
    assert result.plan is not None and result.plan.budget == 3 * 2**30 * 3 // 4
    assert result.plan_line().startswith("plan for 2.25 GiB: ")
    assert result.notes == ("out of memory with the plan for 3 GiB",)
    assert not managed.loaded and [m.tag for m in cached_pipelines()] == ["budget 2.25 GiB"]

    again = mlnb.load_pipeline(tiny_sd, budget="3GiB", device=FakeDevice())
    oom_first(99)
    with pytest.raises(OutOfMemoryRescueError, match="with the plan for 3 GiB and again with the plan for 2.25 GiB"):
        generate_with_rescue(again, prompt="a fox", **FAST)


def test_oom_with_a_plan_falls_back_to_ultra_when_no_smaller_plan_fits(tiny_sd, oom_first, clean_cache, monkeypatch):
    from mlnb.pipeline import rescue

    managed = mlnb.load_pipeline(tiny_sd, budget="3GiB", device=FakeDevice())
    monkeypatch.setattr(rescue, "SAFER_PLAN_FACTOR", 1e-6)  # a budget of a few KiB: nothing fits
    tried = oom_first(1)
    result = generate_with_rescue(managed, prompt="a fox", seed=1, **FAST)
    assert tried[-1] is L.ULTRA and result.level is L.ULTRA
    assert result.notes == ("out of memory with the plan for 3 GiB",)


def test_a_streamed_generation_records_its_host_time_per_unit_and_what_its_step_took_beyond_both_chains(
        tiny_sd, clean_cache, tmp_path, monkeypatch):
    """With a resident step, its timeline and its forward's host time known for the card, a generation that streamed
    two blocks records the host's time per streamed unit beyond the resident forward's (the streamer's hooks), and
    per unit what its step took beyond the larger of the GPU chain (the replay) and the host chain; the next
    prediction is that larger chain plus the residual: the step measured."""
    import torch

    from mlnb.planner import BlockTimer, StepTimer, Workload, card_facts, record_measured, streamed_step

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    device = FakeDevice(cuda_like=True)  # measurements are recorded only on a CUDA card
    managed = mlnb.load_pipeline(tiny_sd, budget="3GiB", device=FakeDevice())
    managed.device = device
    work = Workload(64, 64, 1, 4)
    blocks = managed.plan_facts.blocks
    managed.plan = dataclasses.replace(managed.plan, strategy="stream", streamed=(blocks[0].name, blocks[1].name),
                                       streamed_bytes=blocks[0].nbytes + blocks[1].nbytes)
    rows = tuple((b.name, 0.001 * i, 0.001) for i, b in enumerate(blocks))  # a light forward: the host is longer
    forward = 0.001 * len(blocks)
    record_measured(device, managed.model_key, work, step_seconds=forward + 0.002, block_timeline=(forward, rows),
                    host_forward_seconds=0.02)
    card = card_facts(device, managed.model_key, work)
    replay = streamed_step(managed.plan, managed.plan_facts, card, calibrated=False)
    assert replay < 0.02
    now = [0.0]
    issue = torch.nn.Identity()  # stands in for the denoiser: the host's clock around each forward is what counts
    with BlockTimer(device, issue, None, clock=lambda: now[0]) as issued:
        for _ in range(3):  # each streamed forward takes the host 30 ms to issue: 5 ms per streamed unit more
            handle = issue.register_forward_pre_hook(lambda m, a: now.__setitem__(0, now[0] + 0.03))
            issue(torch.ones(1))
            handle.remove()
    assert issued.host_forward_seconds == pytest.approx(0.03)
    ticks = iter([0.0, 0.04, 0.08])  # streamed steps of 40 ms: 8 ms beyond the host chain's 32
    timer = StepTimer(lambda: None, clock=lambda: next(ticks))
    timer.mark(), timer.mark(), timer.mark()
    learning.record(managed.learning_context(), work, timer, None, blocks=issued)
    facts = card_facts(device, managed.model_key, work, measure=False)
    assert facts.host_unit_seconds == pytest.approx(0.005) and facts.host_forward_seconds == 0.02
    assert facts.unit_overhead == pytest.approx(0.004, abs=1e-5) and facts.step_seconds == forward + 0.002
    assert streamed_step(managed.plan, managed.plan_facts, facts) == pytest.approx(0.04, abs=2e-5)


def test_a_plan_records_its_tiled_decode_and_the_rest_and_the_next_prediction_uses_them(tiny_sd, clean_cache, tmp_path,
                                                                                     monkeypatch):
    """Measured on the card, not derived: a decode in the plan's tiles, and the time besides the steps and decode
    (for a plan that offloads the encoders, under its own name)."""
    from mlnb.planner import StepTimer, Workload, card_facts, record_measured

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    device = FakeDevice(cuda_like=True)
    managed = mlnb.load_pipeline(tiny_sd, budget="3GiB", device=FakeDevice())
    managed.device = device
    work = Workload(64, 64, 1, 2)
    managed.plan = dataclasses.replace(managed.plan, strategy="stream", streamed=("down_blocks.0",), vae_tile=256,
                                       offload_encoders_vae=True, streamed_bytes=0, transfer_once_bytes=10**6)
    record_measured(device, managed.model_key, work, step_seconds=0.05, decode_seconds=0.02)
    before = card_facts(device, managed.model_key, work)
    _, predicted = managed.predict(work)
    assert before.decode(work, 256) == pytest.approx(0.02)  # 64² fits one 256 px tile: its pixels are the image's
    copies = 2 * managed.plan_facts.blocks[0].nbytes / device.h2d_bandwidth()  # down_blocks.0, at both steps
    assert predicted == pytest.approx(2 * 0.05 + copies + 0.02 + managed.plan.transfer_once_bytes / device.h2d_bandwidth())
    ticks = iter([0.0, 0.05, 0.10, 0.16])  # two steps of 50 ms, then a decode of 60 ms
    timer = StepTimer(lambda: None, clock=lambda: next(ticks))
    timer.mark(), timer.mark(), timer.mark()
    timer.finish()
    assert timer.decode_seconds == pytest.approx(0.06)
    learning.record(managed.learning_context(), work, timer, None, seconds=0.45)  # 0.10 of steps, 0.06 of decode, 0.29 besides
    facts = card_facts(device, managed.model_key, work, measure=False)
    assert facts.decode_seconds_256 == pytest.approx(0.06) and facts.decode_seconds == 0.02  # the untiled one kept
    assert facts.other_offload_seconds == pytest.approx(0.29) and facts.other_seconds is None
    _, predicted = managed.predict(work)
    assert predicted == pytest.approx(2 * 0.05 + copies + 0.06 + 0.29, rel=1e-3)


def test_block_timer_gives_each_block_s_start_and_time_in_the_forward_it_timed(tiny_sdxl, clean_cache):
    """On the CPU the marks are the host clock (the compute is done when a hook runs): the timeline of the second
    forward has every block the planner knows, in the order they ran, one after the other inside the forward."""
    from mlnb.device import CpuDevice
    from mlnb.planner import BlockTimer, StepTimer, denoiser_blocks

    managed = mlnb.load_pipeline(tiny_sdxl, level="none", device=CpuDevice())
    pipe = managed.pipe
    blocks = denoiser_blocks(pipe)
    timer = StepTimer.on(managed.device)
    with BlockTimer(managed.device, pipe.unet, blocks) as timed:
        pipe("a fox", num_inference_steps=3, width=64, height=64, output_type="pil",
             callback_on_step_end=timer.callback())
    timer.finish()
    forward, rows = timed.timeline()
    assert {name for name, _, _ in rows} == set(blocks) and len(rows) == len(blocks)
    assert [name for name, _, _ in rows][:2] == ["down_blocks.0", "down_blocks.1"]  # the order they ran in
    assert [name for name, _, _ in rows][-1].startswith("up_blocks")
    for (_, start, seconds), (_, following, _) in zip(rows, rows[1:]):
        assert seconds > 0 and start + seconds <= following  # one after the other
    assert rows[-1][1] + rows[-1][2] <= forward <= 1.5 * timer.step_seconds
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in blocks.values())  # hooks gone after the call
    never = BlockTimer(managed.device, pipe.unet, blocks, forward=5)
    with never:
        pipe("a fox", num_inference_steps=3, width=64, height=64, output_type="pil")
    assert never.timeline() is None  # three steps: no sixth forward


def test_block_timer_refuses_a_forward_in_which_a_block_ran_twice():
    import torch

    from fakes import calls_a_twice
    from mlnb.device import CpuDevice
    from mlnb.planner import BlockTimer

    model = calls_a_twice()
    with BlockTimer(CpuDevice(), model, {"a": model.a, "b": model.b}, forward=0) as timed:
        model(torch.ones(1, 4))
    assert timed.timeline() is None
    with BlockTimer(CpuDevice(), model, {"b": model.b}, forward=0) as timed:
        model(torch.ones(1, 4))
    assert [name for name, _, _ in timed.timeline()[1]] == ["b"]


def test_a_resident_generation_on_a_card_records_its_block_timeline_and_a_streamed_one_its_overhead_per_unit(
        tiny_sd, clean_cache, tmp_path, monkeypatch):
    from mlnb.planner import StepTimer, Workload, card_facts, streamed_step

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    managed = mlnb.load_pipeline(tiny_sd, budget="3GiB", device=FakeDevice())
    assert managed.plan.strategy == "resident"
    managed.device = FakeDevice(cuda_like=True)  # measurements are recorded on a CUDA card only
    managed.generate("a fox", steps=3, width=64, height=64, seed=1)
    work = Workload(64, 64, 1, 3)
    card = card_facts(managed.device, managed.model_key, work, measure=False)
    forward, rows = card.block_timeline
    assert {b.name for b in managed.plan_facts.blocks} == {name for name, _, _ in rows}
    assert 0 < forward and card.step_seconds > 0
    assert card.host_forward_seconds > 0  # the third forward's, timed on the host
    # The same model streaming two blocks: what its step took beyond the replay of its plan, per unit, is recorded.
    streamed = tuple(b.name for b in managed.plan_facts.blocks[:2])
    managed.plan = dataclasses.replace(managed.plan, strategy="stream", streamed=streamed,
                                       streamed_bytes=sum(b.nbytes for b in managed.plan_facts.blocks[:2]))
    replayed = streamed_step(managed.plan, managed.plan_facts, card, calibrated=False)
    ticks = iter([0.0, 2 * replayed, 4 * replayed])  # steps twice as long as the replay
    timer = StepTimer(lambda: None, clock=lambda: next(ticks))
    timer.mark(), timer.mark(), timer.mark()
    learning.record(managed.learning_context(), work, timer, None)
    after = card_facts(managed.device, managed.model_key, work, measure=False)
    chains = streamed_step(managed.plan, managed.plan_facts, card)  # the replay, or the host's time if longer
    # stored to 10 µs, as every time in the card facts
    assert after.unit_overhead == pytest.approx((2 * replayed - chains) / 2, abs=1e-5)
    assert after.block_timeline == card.block_timeline
    assert streamed_step(managed.plan, managed.plan_facts, after) == pytest.approx(2 * replayed, abs=2e-5)


def test_fragmentation_is_recorded_only_from_a_generation_that_started_with_an_empty_cache(tiny_sd, clean_cache,
                                                                                            tmp_path, monkeypatch):
    """Blocks the allocator still cached when a generation started would read as fragmentation of its loop."""
    from types import SimpleNamespace

    from mlnb.planner import StepTimer, Workload, card_facts
    from mlnb.units import GiB, MiB

    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    managed = mlnb.load_pipeline(tiny_sd, budget="3GiB", device=FakeDevice())
    managed.device = FakeDevice(cuda_like=True)
    work = Workload(64, 64, 1, 2)

    def record(cached_at_start: int, reserved_at_end: int) -> int | None:
        ticks, peaks = iter([0.0, 0.1]), iter([5 * GiB, 6 * GiB])
        timer = StepTimer(lambda: None, clock=lambda: next(ticks), peak=lambda: next(peaks),
                          reserved=lambda: reserved_at_end)
        timer.mark(), timer.mark()
        start = SimpleNamespace(start_allocated=5 * GiB, start_reserved=5 * GiB + cached_at_start,
                                peak_allocated=6 * GiB)
        learning.record(managed.learning_context(), work, timer, start)
        return card_facts(managed.device, managed.model_key, work, measure=False).fragmentation_reserve

    assert record(cached_at_start=0, reserved_at_end=6 * GiB + 300 * MiB) == 300 * MiB
    assert record(cached_at_start=2 * GiB, reserved_at_end=8 * GiB) == 300 * MiB  # not taken: the cache was full


@pytest.mark.parametrize("capability", [(7, 5), (8, 0)])
def test_a_card_that_computes_bf16_gets_an_sdxl_vae_that_decodes_in_bf16(tiny_sdxl, clean_cache, capability):
    """On compute capability 8.0 and up the fp16 SDXL VAE is stored and run in bf16 (no fp32 upcast); on a T4 (7.5),
    where bf16 is emulated, diffusers' upcast stays."""
    import torch

    native = capability >= (8, 0)
    device = FakeDevice(compute_capability=capability)
    managed = mlnb.load_pipeline(tiny_sdxl, level="none", dtype="fp16", device=device)
    assert managed.pipe.vae.dtype == (torch.bfloat16 if native else torch.float16)
    assert ("VAE decodes in bf16" in repr(managed)) is native
    result = managed.generate("a fox", steps=1, width=64, height=64, seed=1)
    assert result.images[0].size == (64, 64) and np.asarray(result.images[0]).std() > 0
    assert managed.pipe.vae.dtype == (torch.bfloat16 if native else torch.float16)


def test_the_time_a_generation_records_besides_its_steps_runs_to_the_end_of_its_cleanup(tiny_sd, clean_cache,
                                                                                      monkeypatch):
    """A plan predicts what a call to ``generate`` takes, so what it learns from one runs from the call's start to the
    end of the cleanup (a cache clear is part of what the user waits for), not only the pipeline's call."""
    seen = []
    monkeypatch.setattr(learning, "record",
                        lambda context, work, timer, report, seconds, blocks: seen.append(seconds))
    managed = mlnb.load_pipeline(tiny_sd, level="none", device=FakeDevice())
    result = managed.generate("a fox", seed=1, **FAST)
    phases = result.phase_seconds
    assert seen[0] == pytest.approx(phases["before"] + phases["pipeline"] + phases["cleanup"], abs=1e-6)
    assert seen[0] > result.seconds == phases["pipeline"]


def test_diffusers_warning_about_an_empty_list_of_fp32_modules_is_dropped_and_a_real_one_kept(tiny_sdxl, clean_cache,
                                                                                              caplog):
    """On a card without bf16 an SDXL pipeline casts its VAE to fp32 and back at every decode, and diffusers warns
    each time about modules to keep in fp32, naming none."""
    import logging

    managed = mlnb.load_pipeline(tiny_sdxl, level="none", dtype="fp16", device=FakeDevice())  # a T4: upcast stays
    with caplog.at_level(logging.WARNING, logger="diffusers.models.modeling_utils"):
        managed.generate("a fox", seed=1, steps=1, width=64, height=64)
        logging.getLogger("diffusers.models.modeling_utils").warning("should be kept in float32: ['norm']")
    messages = [r.getMessage() for r in caplog.records if r.name == "diffusers.models.modeling_utils"]
    assert messages == ["should be kept in float32: ['norm']"]


def test_a_config_given_to_load_pipeline_is_the_one_generation_cleans_up_with(tiny_sd, clean_cache):
    """``cuda_cache_clear=False`` (or ``gc_collect=False``) given at load holds for each generation's cleanup too,
    not only the level's settings: the deferred release after it does not clear the cache."""
    from mlnb.levels import MemoryOptimizationConfig
    from mlnb.monitor import release

    device = FakeDevice()

    def activations(managed):
        managed.pipe.unet.register_forward_hook(lambda *a: (device.allocate(2**20), device.release(2**20)) and None)

    config = MemoryOptimizationConfig.from_level("none", cuda_cache_clear=False)
    managed = mlnb.load_pipeline(tiny_sd, config=config, device=device)
    assert managed.config is config
    activations(managed)
    release.release_now()
    calls = device.empty_cache_calls
    result = managed.generate("a fox", seed=1, **FAST)
    assert result.memory.deferred and release.release_now()
    assert device.empty_cache_calls == calls and "cuda_cache_clear" not in result.memory.cleanup
    mlnb.unload_all()
    default = mlnb.load_pipeline(tiny_sd, level="none", device=device)
    activations(default)
    calls = device.empty_cache_calls
    assert default.generate("a fox", seed=1, **FAST).memory.deferred and release.release_now()
    assert device.empty_cache_calls == calls + 1


def test_numpy_integers_are_taken_as_the_ints_they_are(tiny_sd):
    import numpy

    managed = mlnb.load_pipeline(tiny_sd, level="none")
    result = managed.generate("a fox", steps=numpy.int64(2), seed=numpy.int64(3), width=64, height=64)
    assert result.seed == 3 and type(result.seed) is int and result.params["steps"] == 2


def test_a_user_callback_runs_after_mlnb_s_and_progress_and_step_times_still_work(tiny_sd):
    """A ``callback_on_step_end`` of the user's is chained after mlnb's step marker (it used to replace it, and the
    progress bar and the planner's step times went silent); what it returns is what the pipeline uses."""
    managed = mlnb.load_pipeline(tiny_sd, level="none")
    seen, progress = [], []

    def mine(pipe, step, timestep, callback_kwargs):
        seen.append(step)
        return {"latents": callback_kwargs["latents"] * 0}  # the pipeline must use what this returns

    result = managed.generate("a fox", seed=1, steps=3, width=64, height=64, callback_on_step_end=mine,
                              progress=lambda step, total: progress.append((step, total)))
    assert seen == [0, 1, 2] and progress == [(1, 3), (2, 3), (3, 3)]
    assert result.step_seconds is not None and result.first_step_seconds is not None
    plain = managed.generate("a fox", seed=1, steps=3, width=64, height=64)
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))  # the zeroed latents


def test_two_threads_generating_on_one_pipeline_take_turns(tiny_sd):
    """The scheduler and the hooks hold a call's state: a second call from another thread (the dashboard's button
    beside a cell) waits for the first instead of both failing; each gets its own seed's image."""
    import threading

    managed = mlnb.load_pipeline(tiny_sd, level="none")
    alone = {s: np.asarray(managed.generate("a fox", seed=s, steps=3, width=64, height=64).images[0]) for s in (1, 2)}
    results, errors = {}, []

    def run(seed):
        try:
            results[seed] = np.asarray(managed.generate("a fox", seed=seed, steps=3, width=64, height=64).images[0])
        except Exception as exc:  # the failure this test is about
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(np.array_equal(results[s], alone[s]) for s in (1, 2))


@pytest.mark.parametrize("kwargs, message", [
    (dict(level="turbo"), "unknown level 'turbo'"),
    (dict(dtype="int8"), "unknown dtype 'int8'"),
    (dict(budget=float("inf")), "budget: size must be a finite number of bytes"),
    (dict(budget=[1]), "budget: cannot read size [1]"),
    (dict(budget=True), "budget: cannot read size True"),
    (dict(config="balanced"), "config must be a MemoryOptimizationConfig, got str"),
    (dict(level="ultra", config="none"), "config must be a MemoryOptimizationConfig"),
], ids=["level", "dtype", "inf-budget", "list-budget", "bool-budget", "config-str", "config-and-level"])
def test_load_arguments_are_one_line_mlnb_errors_before_anything_loads(tiny_sd, kwargs, message):
    with pytest.raises(InvalidArgumentError) as info:
        mlnb.load_pipeline(tiny_sd, **kwargs)
    assert message in str(info.value)
    assert cached_pipelines() == [] or all(m.model != str(tiny_sd) or m.loaded for m in cached_pipelines())


def test_a_model_that_is_not_a_path_and_a_dtype_mlnb_does_not_run_are_refused():
    import torch

    with pytest.raises(InvalidArgumentError, match="model must be a hub id .* got NoneType"):
        mlnb.load_pipeline(None)
    with pytest.raises(InvalidArgumentError, match="dtype torch.float64 is not one mlnb runs"):
        mlnb.load_pipeline("org/name", dtype=torch.float64)


def test_a_config_and_a_level_that_disagree_are_refused_and_the_cached_pipeline_stays(tiny_sd):
    """Both given: the config sets the level, and a different level was a silent surprise; a failed load must not
    have dropped the cached copy first."""
    from mlnb.levels import MemoryOptimizationConfig

    kept = mlnb.load_pipeline(tiny_sd, level="none")
    config = MemoryOptimizationConfig.from_level("none", vae_tiling=True, vae_tile_size=64)
    with pytest.raises(InvalidArgumentError, match="level 'ultra' and a config of level 'none'"):
        mlnb.load_pipeline(tiny_sd, level="ultra", config=config)
    assert kept.loaded and kept in cached_pipelines()


def test_the_cache_tells_budgets_apart_to_the_byte_and_a_custom_config_from_its_level(tiny_sd):
    """Two budgets shown alike ("3.7 GiB") are two plans: the larger must not serve the smaller. A config of the
    user's is its own entry: the same config again is a hit, the plain level is another pipeline."""
    from mlnb.levels import MemoryOptimizationConfig

    card = FakeDevice()  # one card: the cache tells devices apart
    first = mlnb.load_pipeline(tiny_sd, budget="3.74GiB", device=card)
    second = mlnb.load_pipeline(tiny_sd, budget="3.70GiB", device=card)
    assert second is not first and second.plan.budget == int(3.70 * 2**30) and not first.loaded
    assert mlnb.load_pipeline(tiny_sd, budget=int(3.70 * 2**30), device=card) is second
    config = MemoryOptimizationConfig.from_level("none", vae_tiling=True, vae_tile_size=64)
    custom = mlnb.load_pipeline(tiny_sd, config=config)
    assert mlnb.load_pipeline(tiny_sd, config=config) is custom  # reloaded (and the handle unloaded) before
    plain = mlnb.load_pipeline(tiny_sd, level="none")
    assert plain is not custom and plain.config == MemoryOptimizationConfig.from_level("none")


def test_one_copy_of_a_model_whatever_its_dtype(tiny_sd):
    fp32 = mlnb.load_pipeline(tiny_sd, level="none", dtype="fp32")
    fp16 = mlnb.load_pipeline(tiny_sd, level="none", dtype="fp16")
    assert not fp32.loaded and [m for m in cached_pipelines() if m.model == str(tiny_sd)] == [fp16]


def test_saving_from_python_names_the_problem_without_the_magic_s_option(tiny_sd, tmp_path):
    result = mlnb.load_pipeline(tiny_sd, level="none").generate("a fox", seed=1, **FAST)
    with pytest.raises(ValueError, match=r"'.*fox.txt' is neither an existing folder nor a .png/.jpg/.webp file name"):
        result.save(tmp_path / "fox.txt")
    with pytest.raises(FileNotFoundError, match=r"^folder '.*missing' does not exist$"):
        result.save(tmp_path / "missing" / "fox.png")
    result.save(tmp_path / "fox.png")
    with pytest.raises(FileExistsError, match=r"^'.*fox.png' exists; mlnb never overwrites"):
        result.save(tmp_path / "fox.png")
    assert list(tmp_path.iterdir()) == [tmp_path / "fox.png"]


def test_the_unload_warning_names_the_dtype_only_when_it_changes(tiny_sd, caplog):
    mlnb.load_pipeline(tiny_sd, level="none", dtype="fp32")
    with caplog.at_level("WARNING"):
        mlnb.load_pipeline(tiny_sd, level="balanced", dtype="fp32")
        mlnb.load_pipeline(tiny_sd, level="balanced", dtype="fp16")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("unloading")]
    assert lines == [f"unloading {tiny_sd} (none) to load it again as balanced",
                     f"unloading {tiny_sd} (balanced, fp32) to load it again as balanced, fp16"]


def test_unloading_from_another_thread_waits_for_the_running_generation(tiny_sd):
    """``%vram free`` in a cell while the dashboard generates: the generation finishes with its image, then the
    pipeline goes (dropping it mid-call failed the generation)."""
    import threading

    managed = mlnb.load_pipeline(tiny_sd, level="none")
    started, results, errors = threading.Event(), [], []

    def slow_progress(step, total):
        started.set()
        time.sleep(0.2)

    def run():
        try:
            results.append(managed.generate("a fox", seed=1, steps=3, width=64, height=64, progress=slow_progress))
        except Exception as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(30)
    managed.unload()  # waits
    worker.join(30)
    assert errors == [] and len(results) == 1 and not managed.loaded


def test_auto_without_cuda_reuses_the_none_pipeline_loaded_by_name(tiny_sd):
    """auto on a CPU is `none`: it unloaded the same pipeline and loaded it again."""
    named = mlnb.load_pipeline(tiny_sd, level="none", device=CpuDevice())
    assert mlnb.load_pipeline(tiny_sd, device=CpuDevice()) is named and named.loaded


# ---------------------------------------------------------------------------------------------------------------
# Keyword arguments of load_pipeline, and secrets in what it shows


@pytest.mark.parametrize("kwargs, named, close", [
    (dict(revison="main"), "revison=", "did you mean revision"),
    (dict(levle="none"), "levle=", "did you mean level"),
    (dict(lora=["fox.safetensors"]), "lora=", "did you mean loras"),
    (dict(schedular=None), "schedular=", "did you mean scheduler"),
], ids=["from_pretrained-typo", "load_pipeline-typo", "loras-typo", "component-typo"])
def test_load_pipeline_refuses_a_keyword_neither_it_nor_from_pretrained_takes(tiny_sd, kwargs, named, close):
    """A misspelt keyword was passed to from_pretrained, which ignored it: the load ran without the setting the user
    believed given. It is one line naming the keyword and what it is close to, before anything loads."""
    with pytest.raises(InvalidArgumentError) as info:
        mlnb.load_pipeline(tiny_sd, **kwargs)
    message = _one_line(info.value)
    assert message.startswith(f"load_pipeline got an unknown keyword argument {named}: ")
    assert (close in message) if close else "did you mean" not in message
    assert cached_pipelines() == []


def test_load_pipeline_takes_from_pretrained_s_keywords_and_the_pipeline_s_components(tiny_sd):
    """from_pretrained's own keywords (``revision``, ``use_safetensors``...), a component to replace
    (``scheduler=``) and a pipeline setting (``requires_safety_checker``) are passed on; ``torch_dtype`` is
    ``dtype``."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    managed = mlnb.load_pipeline(tiny_sd, level="none", scheduler=scheduler, requires_safety_checker=False,
                                 revision=None, low_cpu_mem_usage=True, torch_dtype="fp16")
    assert managed.pipe.scheduler is scheduler and managed.key[1] == "fp16"
    with pytest.raises(InvalidArgumentError, match="dtype and torch_dtype are one argument: give dtype"):
        mlnb.load_pipeline(tiny_sd, level="none", dtype="fp32", torch_dtype="fp16")


def test_a_keyword_of_a_hub_model_not_in_the_cache_is_checked_once_its_pipeline_class_is_known(monkeypatch):
    """Without the model's index at hand (a hub model not downloaded yet), the names only its pipeline could take
    are checked against the pipeline once it is read, before it is placed or cached."""
    from mlnb.pipeline import files

    class HubPipeline:
        def __init__(self, unet, scheduler, requires_safety_checker: bool = True) -> None:
            self.components = {"unet": unet, "scheduler": scheduler}

    monkeypatch.setattr(files, "load_diffusers_pipeline", lambda *a, **k: HubPipeline(None, None))
    with pytest.raises(InvalidArgumentError, match=r"unknown keyword argument schedular=: .*did you mean scheduler"):
        mlnb.load_pipeline("mlnb-tests/not-downloaded", level="none", schedular=None)
    assert cached_pipelines() == []


def test_a_token_never_shows_in_the_unload_warning_or_the_logs(tiny_sd, caplog, capsys):
    """``token=`` reaches from_pretrained (a local folder ignores it), but what mlnb shows of the arguments (the
    warning that a cached copy is replaced because an argument changed, its debug lines) masks it."""
    first, second = "hf_" + "a1" * 17, "hf_" + "b2" * 17
    with caplog.at_level(logging.DEBUG, logger="mlnb"):
        old = mlnb.load_pipeline(tiny_sd, level="none", token=first)
        new = mlnb.load_pipeline(tiny_sd, level="none", token=second)
    assert new is not old and not old.loaded
    shown = caplog.text + "".join(capsys.readouterr())
    assert "(none, token='***') to load it again as none, token='***'" in shown
    assert first not in shown and second not in shown
    with pytest.raises(InvalidArgumentError) as info:
        old.generate("a fox", **FAST)
    assert first not in str(info.value) and second not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# One check, one result, one remember


def test_a_generation_checks_its_arguments_once_and_remembers_one_result_built_once(tiny_sd, oom_first,
                                                                                     monkeypatch):
    """Through the OOM rescue too: the arguments are checked once (not again for the retry), the result comes out
    of the retry as built (the rescue's note in it, not replaced afterwards) and is remembered once."""
    from mlnb.pipeline import GenerationArgs, cache

    checks, remembered = [], []
    checked = GenerationArgs.checked.__func__
    monkeypatch.setattr(GenerationArgs, "checked",
                        classmethod(lambda cls, *a, **k: checks.append(1) or checked(cls, *a, **k)))
    remember = cache.remember
    monkeypatch.setattr(cache, "remember", lambda result: remembered.append(result) or remember(result))
    managed = mlnb.load_pipeline(tiny_sd, level="none", device=FakeDevice())
    oom_first(1)
    result = generate_with_rescue(managed, prompt="a fox", seed=1, **FAST)
    assert checks == [1] and remembered == [result] and last_result() is result
    assert result.notes == ("out of memory at none",) and result.rescued_from is L.NONE
    assert set(result.phase_seconds) == {"before", "pipeline", "cleanup", "after"}


def test_the_result_carries_the_plan_and_the_setting_as_given(tiny_sd):
    """The plan object travels into the result (not its text), with the memory setting as the user gave it."""
    managed = mlnb.load_pipeline(tiny_sd, budget="3.75GiB", device=FakeDevice())
    result = managed.generate("a fox", seed=1, **FAST)
    assert result.plan is managed.plan and result.plan.budget == 4_026_531_840
    assert result.setting is managed.setting and str(result.setting) == "3.75 GiB"
    assert result.report_line().split(" · ")[4].startswith(f"plan for 3.75 GiB: {managed.plan.summary()}; predicted ")
    assert managed.tag == "budget 3.75 GiB" and managed.key[2] == "budget 4026531840 B"
