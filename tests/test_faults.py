"""Faults and bad input in a real shell: each failure ends in one clear line and nothing is lost.

Every case checks the message *and* the state after it: a following cell runs, the cached pipeline is still
there when the failure was the user's, and the fake GPU's allocated/reserved memory is back at its baseline.
GPU faults are simulated on the CPU: a :class:`~mlnb.testing.FakeDevice` is the current device and a component's
``forward`` (``decode`` for the VAE) is patched to allocate a fake-GPU workspace and raise.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import types
import weakref
from pathlib import Path

import pytest
import torch
from IPython.core.error import UsageError

import mlnb
from fakes import FakeCuda
from mlnb.device import CpuDevice, CudaDevice, use_device
from mlnb.device.nvml import Nvml
from mlnb.levels import MemoryOptimizationConfig, Technique
from mlnb.optimizer import MemoryOptimizer
from mlnb.monitor import release
from mlnb.pipeline import cached_pipelines, load_pipeline, unload_all
from mlnb.session import defaults
from mlnb.testing import FakeDevice, FakeOutOfMemoryError
from mlnb.setting import MemorySetting
from mlnb.units import GiB, MiB

GEN = "--steps 1 --width 64 --height 64 --quiet"


# ----------------------------------------------------------------------------------------------------------------
# Fixtures and helpers






pytestmark = pytest.mark.usefixtures("fresh_defaults")


@pytest.fixture(scope="module")
def gpu():
    """One fake 4 GiB GPU for the whole module, so that pipelines cached by one test stay usable by the next."""
    device = FakeDevice(total=4 * GiB)
    with use_device(device):
        yield device


@pytest.fixture
def sd(ip, gpu, tiny_sd):
    """The tiny SD pipeline loaded at level none on the fake GPU; the session's model and level name it."""
    managed = loaded_on(gpu, tiny_sd, "none")
    defaults.model, defaults.setting = str(tiny_sd), MemorySetting.of_level("none")
    assert (gpu.allocated, gpu.reserved) == (0, 0)
    return managed


def loaded_on(gpu: FakeDevice, model, level: str):
    """``load_pipeline(model, level)`` on the fake GPU, also when another test module cached it on another device."""
    managed = load_pipeline(model, level=level)
    if managed.device is not gpu or len(cached_pipelines()) > 1:
        unload_all()
        managed = load_pipeline(model, level=level)
    return managed


@pytest.fixture
def fresh(ip, gpu):
    """No pipeline cached before or after the test."""
    unload_all()
    yield
    unload_all()


def run(ip, source: str):
    return ip.run_cell(source, store_history=True)


def failing_cell(ip, source: str, capsys, only_line: bool = True) -> str:
    """Run a cell that must end in a one-line UsageError and no traceback; returns the message.

    ``only_line``: the error line is all the cell printed (a user mistake). Otherwise mlnb's warnings (an OOM retry)
    may come first, but the cell still ends with that one line.
    """
    capsys.readouterr()
    result = run(ip, source)
    assert isinstance(result.error_in_exec, UsageError), repr(result.error_in_exec)
    captured = capsys.readouterr()
    text = (captured.out + captured.err).strip()
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("UsageError: "), text
    if only_line:
        assert len(lines) == 1, text
    assert lines[-1] == f"UsageError: {result.error_in_exec}"
    return lines[-1]


def assert_state_after(ip, gpu: FakeDevice | None = None, keeps=(), remembered=None) -> None:
    """The shell still runs cells, ``keeps`` are still cached and loaded, and the fake GPU is at its baseline."""
    result = run(ip, "_mlnb_probe = 6 * 7")
    assert result.success and ip.user_ns["_mlnb_probe"] == 42
    for managed in keeps:
        assert managed.loaded and any(m is managed for m in cached_pipelines()), managed
    if remembered is not None:
        assert defaults.model == str(remembered)
    if gpu is not None:
        assert release.wait_idle(5.0)  # the cache goes back once the kernel is idle
        assert (gpu.allocated, gpu.reserved) == (0, 0), (gpu.allocated, gpu.reserved)


def device_tensor(gpu: FakeDevice, nbytes: int = 8 * MiB, refs: list | None = None):
    """A CPU tensor the fake GPU counts as allocated until it is garbage-collected (like a CUDA tensor)."""
    tensor = gpu.track(torch.empty(nbytes // 4))
    gpu.allocate(tensor.nbytes)
    weakref.finalize(tensor, gpu.release, tensor.nbytes)
    if refs is not None:
        refs.append(weakref.ref(tensor))
    return tensor


def _component(where: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"text_encoder": (CLIPTextModel, "forward"), "unet": (UNet2DConditionModel, "forward"),
            "vae": (AutoencoderKL, "decode")}[where]


def inject(monkeypatch, gpu: FakeDevice, where: str, make_error, times: int | None = None) -> list:
    """Make ``where``'s forward allocate a fake-GPU workspace and raise ``make_error()`` (the first ``times`` calls).

    Returns weak references to the workspaces, to check that nothing keeps them alive.
    """
    cls, name = _component(where)
    original = getattr(cls, name)
    workspaces: list = []

    def faulty(self, *args, **kwargs):
        if times is None or len(workspaces) < times:
            workspace = device_tensor(gpu, refs=workspaces)  # noqa: F841 (held by this frame when it raises)
            raise make_error()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, faulty)
    return workspaces


def on_component_load(monkeypatch, second) -> list:
    """Record (weakly) each text encoder, UNet and VAE diffusers loads; call ``second(folder)`` before the second."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    loaded: list = []
    calls: list = []
    for cls in (CLIPTextModel, UNet2DConditionModel, AutoencoderKL):
        original = cls.from_pretrained.__func__

        def from_pretrained(klass, path, *args, _original=original, **kwargs):
            calls.append(klass)
            if len(calls) == 2:
                second(Path(path) / kwargs.get("subfolder", ""))
            module = _original(klass, path, *args, **kwargs)
            loaded.append(weakref.ref(module))
            return module

        monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))
    return loaded


def oom():
    return FakeOutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 MiB (fake device)")


def all_dead(refs: list) -> bool:
    return bool(refs) and all(ref() is None for ref in refs)


# ----------------------------------------------------------------------------------------------------------------
# Options: one line, and the cached pipeline and the next cell are untouched


@pytest.mark.parametrize("options,needle", [
    ("--sampler euler", "unrecognized arguments: --sampler euler"),
    ("--steps -5", "--steps must be a whole number >= 1, got -5"),
    ("--width 100", "--width must be a positive multiple of 8, got 100"),
    ("--height 36", "--height must be a positive multiple of 8, got 36"),
    ("--width 100000", "--width must be at most 4096 px, got 100000"),
    ("--height 8192", "--height must be at most 4096 px, got 8192"),
    ("--seed 7.5", "argument --seed: invalid int value: '7.5'"),
    ("--seed -3", "--seed must be a whole number in [0, 2**63), got -3"),
    ("--level maximum", "unknown level 'maximum'"),
    ("--guidance nan", "--guidance must be a finite number >= 0, got nan"),
    ("--num-images 99", "--num-images must be between 1 and 16, got 99"),
    ('--negative "blurry', "%%generate: No closing quotation in the options"),
    ("--out class", "--out must be a variable name, got 'class'"),
    ("--save /tmp/" + "a" * 300 + ".png", "--save: [Errno 36] File name too long"),
], ids=["unknown-flag", "negative-steps", "width-not-x8", "height-not-x8", "absurd-width", "absurd-height",
        "float-seed", "negative-seed", "unknown-level", "nan-guidance", "too-many-images", "unclosed-quote",
        "keyword-out", "name-too-long"])
def test_bad_option_is_one_line_and_loses_nothing(ip, gpu, sd, capsys, options, needle):
    text = failing_cell(ip, f"%%generate {GEN} {options}\na fox", capsys)  # the last of a repeated option wins
    assert needle in text
    assert_state_after(ip, gpu, keeps=[sd], remembered=sd.model)


@pytest.mark.parametrize("body,needle", [
    ("   \n\t\n", "the prompt is empty: write it in the cell body below %%generate"),
    ("a {missing_animal_xyz} in the snow", "{missing_animal_xyz} in the prompt names no variable in the notebook"),
    ("a {In!q} fox", "the prompt has {In!q}: only {In!r} and {In!s} convert a value"),
    ("a {} fox", "the prompt has {}: name a notebook variable inside the braces"),
], ids=["empty-prompt", "missing-variable", "bad-conversion", "positional"])
def test_bad_prompt_is_one_line_and_loses_nothing(ip, gpu, sd, capsys, body, needle):
    assert needle in failing_cell(ip, f"%%generate {GEN}\n{body}", capsys)
    assert_state_after(ip, gpu, keeps=[sd], remembered=sd.model)


def test_save_into_a_missing_folder_writes_nothing(ip, gpu, sd, tmp_path, capsys):
    target = tmp_path / "no-such-folder" / "fox.png"
    text = failing_cell(ip, f"%%generate {GEN} --save {target}\na fox", capsys)
    assert f"--save: folder {str(target.parent)!r} does not exist" in text
    assert not target.parent.exists()
    assert_state_after(ip, gpu, keeps=[sd])


def test_save_onto_an_existing_file_keeps_it_and_the_next_cell_generates(ip, gpu, sd, tmp_path, capsys):
    target = tmp_path / "fox.png"
    target.write_bytes(b"my earlier picture")
    text = failing_cell(ip, f"%%generate {GEN} --save {target}\na fox", capsys)
    assert "exists; mlnb never overwrites" in text
    assert target.read_bytes() == b"my earlier picture"
    assert_state_after(ip, gpu, keeps=[sd])
    # The next %%generate reuses the same pipeline object: nothing was reloaded.
    assert run(ip, f"%%generate {GEN} --seed 1 --out r\na fox").error_in_exec is None
    assert ip.user_ns["r"].images[0].size == (64, 64) and mlnb.last_result() is ip.user_ns["r"]
    assert cached_pipelines() == [sd]
    assert_state_after(ip, gpu, keeps=[sd])


def test_save_clashing_with_the_second_of_several_names_is_refused_before_generating(ip, gpu, sd, tmp_path, capsys):
    (tmp_path / "fox-1.png").write_bytes(b"my earlier picture")
    before = mlnb.last_result()
    text = failing_cell(ip, f"%%generate {GEN} --num-images 2 --out two --save {tmp_path / 'fox.png'}\na fox", capsys)
    assert text == f"UsageError: --save: {str(tmp_path / 'fox-1.png')!r} exists; mlnb never overwrites, choose another name"
    assert mlnb.last_result() is before and "two" not in ip.user_ns  # refused before anything ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox-1.png"]
    assert_state_after(ip, gpu, keeps=[sd])


def test_save_that_fails_after_generating_keeps_and_shows_the_images(ip, gpu, sd, tmp_path, capsys, monkeypatch):
    from PIL import Image

    def disk_full(self, fp, *args, **kwargs):
        if str(fp).startswith(str(tmp_path)):
            raise OSError(28, "No space left on device")
        return real(self, fp, *args, **kwargs)

    real = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", disk_full)
    source = f"%%generate --steps 1 --width 64 --height 64 --seed 3 --out fox --save {tmp_path / 'fox.png'}\na fox"
    text = failing_cell(ip, source, capsys, only_line=False)
    assert text == "UsageError: --save: [Errno 28] No space left on device; the images are in fox and mlnb.last_result()"
    assert mlnb.last_result() is ip.user_ns["fox"] and ip.user_ns["fox"].seed == 3
    assert_state_after(ip, gpu, keeps=[sd])


def test_vram_option_mistakes_are_one_line(ip, gpu, sd, capsys):
    assert failing_cell(ip, "%vram history -n 0", capsys) == "UsageError: %vram history: -n must be >= 1, got 0"
    assert failing_cell(ip, "%vram who -n -3", capsys) == "UsageError: %vram who: -n must be >= 1, got -3"
    assert failing_cell(ip, "%vram history 'x", capsys) == "UsageError: %vram: No closing quotation in the options"
    assert_state_after(ip, gpu, keeps=[sd])


# ----------------------------------------------------------------------------------------------------------------
# Models: a bad model never replaces the good one


def test_missing_model_path(ip, gpu, sd, tmp_path, capsys):
    text = failing_cell(ip, f"%%generate --model {tmp_path / 'models' / 'nope'} {GEN}\na fox", capsys)
    assert "no model folder at" in text
    assert_state_after(ip, gpu, keeps=[sd], remembered=sd.model)  # the bad path is not remembered


def test_empty_folder(ip, gpu, sd, tmp_path, capsys):
    text = failing_cell(ip, f"%%generate --model {tmp_path} {GEN}\na fox", capsys)
    assert "is a folder but not a diffusers pipeline (no model_index.json)" in text
    assert_state_after(ip, gpu, keeps=[sd], remembered=sd.model)


def test_corrupt_safetensors_frees_what_was_already_loaded(ip, gpu, sd, tiny_sd, tmp_path, capsys, monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    corrupted: list = []

    def corrupt_the_second(folder):
        # diffusers' component order differs between versions: corrupt whichever comes second, on disk, just
        # before it is read, so that one component is always loaded when the load fails.
        for weights in folder.glob("*.safetensors"):
            weights.write_bytes(b"not a safetensors file" * 8)
            corrupted.append(weights)

    loaded = on_component_load(monkeypatch, second=corrupt_the_second)
    text = failing_cell(ip, f"%%generate --model {broken} {GEN}\na fox", capsys)
    assert text.startswith(f"UsageError: could not load {str(broken)!r}: ") and corrupted
    assert len(loaded) == 1 and loaded[0]() is None, "the failed load still holds the component it had loaded"
    assert not any(m.model == str(broken) for m in cached_pipelines())
    assert_state_after(ip, gpu, keeps=[sd], remembered=sd.model)


def test_pickle_weights_without_opt_in_load_nothing(ip, gpu, sd, tiny_sd_pickle, capsys):
    text = failing_cell(ip, f"%%generate --model {tiny_sd_pickle} {GEN}\na fox", capsys)
    assert "pickle can run code" in text and "--allow-pickle" in text
    assert [m.model for m in cached_pipelines()] == [sd.model]
    assert_state_after(ip, gpu, keeps=[sd], remembered=sd.model)


def test_hub_id_offline_is_one_line_and_touches_no_network(ip, gpu, sd, capsys, monkeypatch):
    import huggingface_hub.constants

    attempts: list = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as if set before the kernel started
    diffusers_log: list = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = diffusers_log.append
    logging.getLogger("diffusers").addHandler(handler)  # diffusers' logger does not propagate to caplog
    try:
        text = failing_cell(ip, f"%%generate --model mlnb-tests/no-such-model {GEN}\na fox", capsys)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert "'mlnb-tests/no-such-model' is neither a local folder nor in the Hugging Face cache" in text
    assert "HF_HUB_OFFLINE is set (offline)" in text
    assert "give the local folder, e.g. --model /" in text
    assert attempts == []
    assert not [r.getMessage() for r in diffusers_log if "connect" in r.getMessage()]
    assert_state_after(ip, gpu, keeps=[sd], remembered=sd.model)


def test_pipeline_class_without_text_to_image_call_is_refused_at_load(ip, gpu, sd, tiny_sd, tmp_path, capsys,
                                                                    monkeypatch):
    img2img = tmp_path / "img2img"
    shutil.copytree(tiny_sd, img2img)
    index = json.loads((img2img / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionImg2ImgPipeline"  # same components, a call without width/height
    (img2img / "model_index.json").write_text(json.dumps(index))
    loaded = on_component_load(monkeypatch, second=lambda folder: None)
    text = failing_cell(ip, f"%%generate --model {img2img} {GEN}\na fox", capsys)
    assert text == (
        "UsageError: StableDiffusionImg2ImgPipeline is not a text-to-image pipeline mlnb can drive "
        "(its call lacks height, width)"
    )
    assert [m.model for m in cached_pipelines()] == [sd.model]  # refused before it was cached
    gc.collect()  # what is still reachable (the stored traceback's frames) stays
    assert len(loaded) == 3 and all(ref() is None for ref in loaded), "the refused pipeline is still held"
    assert_state_after(ip, gpu, keeps=[sd], remembered=sd.model)


def test_a_budget_too_small_for_the_model_frees_the_pipeline_it_read(ip, gpu, fresh, tiny_sd, capsys, monkeypatch):
    loaded = on_component_load(monkeypatch, second=lambda folder: None)
    # the smallest budget a line may give (below it, the line is refused before any model is read)
    text = failing_cell(ip, f"%%generate --model {tiny_sd} --vram 64MiB {GEN}\na fox", capsys)
    assert text.startswith("UsageError: no placement fits 64.0 MiB")
    gc.collect()
    assert len(loaded) == 3 and all(ref() is None for ref in loaded), "the refused pipeline is still held"
    assert cached_pipelines() == []
    assert_state_after(ip, gpu)


def test_call_signature_changed_after_loading(ip, gpu, sd, capsys, monkeypatch):
    def img2img_call(image, strength=0.8, num_inference_steps=50):
        raise AssertionError("must not be called")

    monkeypatch.setitem(sd.pipe.__dict__, "__call__", img2img_call)  # an instance attribute shadows the class's
    text = failing_cell(ip, f"%%generate {GEN}\na fox", capsys)
    assert "is not a text-to-image pipeline mlnb can drive (its call lacks generator, height, prompt, width)" in text
    assert_state_after(ip, gpu, keeps=[sd], remembered=sd.model)


# ----------------------------------------------------------------------------------------------------------------
# Environment


def test_nvml_failing_on_the_fake_gpu_gives_na_and_generation_still_works(ip, gpu, sd, monkeypatch):
    monkeypatch.setattr(gpu, "nvml_fails", True)  # every NVML query of the card now fails
    status = str(ip.run_line_magic("vram", ""))
    assert "N/A / N/A  (NVML query failed: simulated)" in status and "torch allocated / reserved" in status
    assert run(ip, f"%%generate {GEN} --seed 2\na fox").success
    assert mlnb.last_result().memory.device_used_end is None  # N/A, not a crash
    assert_state_after(ip, gpu, keeps=[sd], remembered=sd.model)




def _pynvml(kind: str):
    if kind == "missing":
        return None
    mod = types.ModuleType("pynvml")

    def init():
        if kind == "init-fails":
            raise RuntimeError("NVML Shared Library Not Found")

    def query(*args):
        raise RuntimeError("GPU is lost")

    mod.nvmlInit = init
    mod.nvmlDeviceGetHandleByIndex = mod.nvmlDeviceGetMemoryInfo = mod.nvmlSystemGetDriverVersion = query
    return mod


@pytest.mark.parametrize("kind,reason", [
    ("missing", "nvidia-ml-py is not installed"),
    ("init-fails", "NVML unavailable: NVML Shared Library Not Found"),
    ("queries-fail", "NVML query failed: GPU is lost"),
])
def test_nvml_missing_or_raising_on_a_cuda_device(ip, capsys, monkeypatch, kind, reason):
    monkeypatch.setitem(sys.modules, "pynvml", _pynvml(kind))
    monkeypatch.setattr(CudaDevice, "_cuda", staticmethod(lambda: FakeCuda()))
    with use_device(CudaDevice(0, nvml=Nvml())):
        ip.run_line_magic("reload_ext", "mlnb")
        banner = capsys.readouterr().out.strip()
        assert "Tesla T4 · VRAM 10.0 GiB free / 16.0 GiB" in banner and banner.count("\n") == 0
        status = str(ip.run_line_magic("vram", ""))
        assert f"N/A / N/A  ({reason})" in status
        assert run(ip, "x = [1] * 10").success  # the per-cell hooks query the device too
        assert_state_after(ip)


def test_no_gpu_everything_runs_on_the_cpu(ip, tiny_sd, capsys):
    with use_device(CpuDevice()):
        unload_all()
        try:
            ip.run_line_magic("reload_ext", "mlnb")
            banner = capsys.readouterr().out.strip()
            assert "CPU (no CUDA device)" in banner and banner.count("\n") == 0
            assert run(ip, f"%%generate --model {tiny_sd} --level none {GEN} --seed 2 --out r\na fox").success
            assert "CPU, host RSS peak" in ip.user_ns["r"].report_line()
            status = str(ip.run_line_magic("vram", ""))
            assert "CPU (no CUDA device)" in status and "VRAM free" not in status and str(tiny_sd) in status
            assert "unloaded 1 pipeline(s)" in str(ip.run_line_magic("vram", "free"))
            assert_state_after(ip)
        finally:
            unload_all()


class _StubPipe:
    """A pipeline stub whose xformers switch runs xformers' kernel once, as diffusers does."""

    components: dict = {}  # what makes it a pipeline to the optimizer

    def __init__(self) -> None:
        self.xformers_on = False
        self.placed_on = None

    def __call__(self, *args, **kwargs):
        raise NotImplementedError("a stub: never generates")

    def enable_xformers_memory_efficient_attention(self):
        import xformers.ops

        q = torch.zeros(1, 4, 1, 8)
        xformers.ops.memory_efficient_attention(q, q, q)
        self.xformers_on = True

    def to(self, device):
        self.placed_on = device
        return self


def _optimize_stub():
    stub = _StubPipe()
    config = MemoryOptimizationConfig.from_level("none", xformers=True, attention_slicing=True)
    report = MemoryOptimizer(config, FakeDevice(cuda_like=True)).optimize_pipeline(stub)  # xformers: tried on CUDA only
    return stub, report


def test_xformers_that_fails_to_import_is_skipped_for_sdpa(tmp_path, monkeypatch):
    package = tmp_path / "xformers"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('xformers was built for torch 2.1.0+cu118')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("xformers", "xformers.ops"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    stub, report = _optimize_stub()
    result = report[Technique.XFORMERS]
    assert not result.applied and not stub.xformers_on
    assert result.detail == (
        "xformers fails to import (RuntimeError: xformers was built for torch 2.1.0+cu118); SDPA in use"
    )
    assert report[Technique.ATTENTION_SLICING].detail.startswith("SDPA in use")  # SDPA, not slicing, is the fallback
    assert stub.placed_on == "cpu" and "xformers" not in report.summary()


def test_xformers_whose_kernel_raises_is_skipped_for_sdpa(monkeypatch, caplog):
    xformers = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")

    def memory_efficient_attention(q, k, v):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    ops.memory_efficient_attention = memory_efficient_attention
    xformers.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", xformers)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    stub, report = _optimize_stub()
    result = report[Technique.XFORMERS]
    assert not result.applied and not stub.xformers_on
    assert result.detail == "xformers failed its test on this GPU (RuntimeError); SDPA in use"
    assert "xformers did not run" in caplog.text and "using SDPA" in caplog.text
    assert "xformers" not in report.summary()


def test_without_ipywidgets_only_the_dashboard_refuses(tiny_sd):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ipywidgets"] = None  # as if it were not installed
        from IPython.testing.globalipapp import start_ipython
        ip = start_ipython()
        ip.run_line_magic("load_ext", "mlnb")
        r = ip.run_cell("%%generate --model {tiny_sd} --level none {GEN} --seed 1 --out r\\na fox")
        assert r.error_in_exec is None, repr(r.error_in_exec)
        print("GENERATED", ip.user_ns["r"].images[0].size)
        print("VRAM", "auto level" in str(ip.run_line_magic("vram", "")))
        r = ip.run_cell("%vram dashboard")
        print("MAGIC", type(r.error_in_exec).__name__, r.error_in_exec)
        import mlnb
        try:
            mlnb.dashboard()
        except ImportError as exc:
            print("API", exc)
        print("NEXT", ip.run_cell("y = 2 + 2").success, sys.modules.get("ipywidgets", 0) is None)
    """)
    env = {**os.environ, "MLNB_DEVICE": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(re.findall(r"^([A-Z]+) (.*)$", done.stdout, flags=re.M))
    hint = 'the mlnb dashboard needs ipywidgets: pip install "mlnb[widgets]" (or pip install ipywidgets)'
    assert lines["GENERATED"] == "(64, 64)" and lines["VRAM"] == "True"
    assert lines["MAGIC"] == f"UsageError {hint}"
    assert lines["API"] == hint
    assert lines["NEXT"] == "True True"


# ----------------------------------------------------------------------------------------------------------------
# Faults during generation


@pytest.mark.parametrize("where", ["text_encoder", "unet", "vae"])
def test_oom_is_retried_at_the_next_level_and_reported(ip, gpu, fresh, tiny_sd, caplog, monkeypatch, where):
    at_none = load_pipeline(tiny_sd, level="none")
    defaults.model = str(tiny_sd)
    workspaces = inject(monkeypatch, gpu, where, oom, times=1)
    result = run(ip, f"%%generate --level none {GEN} --seed 4 --out r\na fox")
    assert result.error_in_exec is None, repr(result.error_in_exec)
    assert "out of memory at level none (FakeOutOfMemoryError); retrying at balanced" in caplog.text
    line = ip.user_ns["r"].report_line()
    assert " · level balanced (" in line and ") after OOM at none · " in line
    assert all_dead(workspaces)
    (at_balanced,) = cached_pipelines()  # the none copy was dropped: a small card cannot hold both
    assert at_balanced.level.value == "balanced" and not at_none.loaded
    assert_state_after(ip, gpu, keeps=[at_balanced], remembered=tiny_sd)


@pytest.mark.parametrize("size,images,hint", [
    (512, 1, "try a smaller size such as --width 384 --height 384"),
    (64, 1, "even 64×64 does not fit in the 4.0 GiB free: %vram who shows what holds GPU memory"),
    (64, 4, "try --num-images 2"),
], ids=["smaller-size", "smallest-size", "fewer-images"])
def test_oom_at_ultra_says_what_would_fit(ip, gpu, tiny_sd, capsys, monkeypatch, size, images, hint):
    ultra = loaded_on(gpu, tiny_sd, "ultra")  # the three cases share it: it stays cached after each
    defaults.model = str(tiny_sd)
    workspaces = inject(monkeypatch, gpu, "unet", oom)
    text = failing_cell(
        ip, f"%%generate --level ultra --steps 1 --width {size} --height {size} --num-images {images} --quiet\na fox",
        capsys,
    )
    assert text.startswith(f"UsageError: out of GPU memory at level ultra for {size}×{size} ×{images}; {hint}")
    assert all_dead(workspaces)
    assert_state_after(ip, gpu, keeps=[ultra], remembered=tiny_sd)  # ultra stays loaded: the size was the problem


def test_oom_again_after_the_retry(ip, gpu, fresh, tiny_sd, capsys, monkeypatch):
    workspaces = inject(monkeypatch, gpu, "text_encoder", oom)
    text = failing_cell(ip, f"%%generate --model {tiny_sd} --level none {GEN}\na fox", capsys, only_line=False)
    assert text.startswith("UsageError: out of GPU memory at level none and again at balanced for 64×64 ×1; ")
    assert len(workspaces) == 2 and all_dead(workspaces)
    (balanced,) = cached_pipelines()
    assert_state_after(ip, gpu, keeps=[balanced], remembered=tiny_sd)


def test_oom_while_placing_the_weights(ip, gpu, fresh, tiny_sd, capsys, monkeypatch):
    held: list = []

    def optimize_on_a_full_card(self, pipe):
        held.append(weakref.ref(pipe))
        workspace = device_tensor(gpu, refs=held)  # noqa: F841 (the weights already moved when it ran out)
        raise oom()

    monkeypatch.setattr(MemoryOptimizer, "optimize_pipeline", optimize_on_a_full_card)
    defaults.model = None
    text = failing_cell(ip, f"%%generate --model {tiny_sd} --level none {GEN}\na fox", capsys)
    assert text == f"UsageError: out of GPU memory loading {str(tiny_sd)!r} at level none; try --level balanced"
    assert all_dead(held), "the pipeline or its GPU workspace outlived the failed load"
    assert cached_pipelines() == [] and defaults.model is None
    assert_state_after(ip, gpu)


def test_keyboard_interrupt_mid_generation(ip, gpu, sd, capsys, monkeypatch):
    workspaces = inject(monkeypatch, gpu, "unet", KeyboardInterrupt, times=1)
    text = failing_cell(ip, f"%%generate {GEN}\na fox", capsys)
    assert text.startswith("UsageError: generation interrupted; memory freed (peak ")
    assert text.endswith(f"freed 8.0 MiB), {sd.model!r} stays loaded")
    assert all_dead(workspaces)
    assert_state_after(ip, gpu, keeps=[sd], remembered=sd.model)
    assert run(ip, f"%%generate {GEN} --seed 5 --out r\na fox").success  # the next cell generates
    assert cached_pipelines() == [sd] and ip.user_ns["r"].seed == 5
    assert_state_after(ip, gpu, keeps=[sd])


def test_an_interrupt_leaves_the_cached_pipeline_s_weights_out_of_the_cleared_frames(ip, gpu, sd, capsys, monkeypatch):
    """The interrupted generation's frames see the cached pipeline's GPU weights through ``self``; the cache keeps
    them allocated whatever happens to the frames, so no "cleared ... frames" line claims them."""
    weights = [gpu.track(p) for p in sd.pipe.unet.parameters()]
    try:
        inject(monkeypatch, gpu, "unet", KeyboardInterrupt, times=1)
        capsys.readouterr()
        run(ip, f"%%generate {GEN}\na fox")
        out = "".join(capsys.readouterr())
        assert "generation interrupted" in out and "cleared" not in out, out
        who = str(ip.run_line_magic("vram", "who"))
        assert "last traceback 0 B" in who, who
    finally:
        for p in weights:
            gpu._tracked.pop(id(p), None)
    assert_state_after(ip, gpu, keeps=[sd], remembered=sd.model)


def test_other_error_inside_the_pipeline_keeps_its_traceback_and_frees_memory(ip, gpu, sd, capsys, monkeypatch):
    workspaces = inject(monkeypatch, gpu, "unet", lambda: RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    capsys.readouterr()
    result = run(ip, f"%%generate {GEN}\na fox")
    assert isinstance(result.error_in_exec, RuntimeError)  # not a user mistake: the traceback is for a bug report
    captured = capsys.readouterr()
    assert "RuntimeError: mat1 and mat2 shapes cannot be multiplied" in captured.out + captured.err
    assert all_dead(workspaces)
    assert_state_after(ip, gpu, keeps=[sd], remembered=sd.model)


def test_error_in_a_user_cell_releases_its_device_tensors(ip, gpu, capsys):
    refs: list = []
    ip.user_ns["_fake_cuda_tensor"] = lambda: device_tensor(gpu, 64 * MiB, refs)
    capsys.readouterr()
    cell = "def _denoise():\n    latents = _fake_cuda_tensor()\n    raise ValueError('shape mismatch')\n_denoise()"
    result = run(ip, cell)
    assert isinstance(result.error_in_exec, ValueError)
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "ValueError: shape mismatch" in out  # the user's own error keeps its traceback
    assert re.search(
        r"\[mlnb\] cleared \d+ traceback frame\(s\) pinning 64\.0 MiB of GPU tensors "
        r"\(traceback: _denoise\(\) local latents\); %debug will not see their locals", out
    ), out
    assert all_dead(refs)
    assert_state_after(ip, gpu)
    del ip.user_ns["_fake_cuda_tensor"]


def test_an_error_in_a_method_of_a_model_the_notebook_keeps_leaves_the_traceback_whole(ip, gpu, capsys):
    """The weights of a model in a variable, seen through a method's ``self`` in the traceback, stay allocated
    whatever happens to the frames: no note, no clearing, ``%debug`` keeps its locals, and ``%vram who`` does not
    count them twice."""
    refs: list = []
    ip.user_ns["_fake_cuda_tensor"] = lambda: device_tensor(gpu, 32 * MiB, refs)
    run(ip, "class _Model:\n    def __init__(self):\n        self.weight = _fake_cuda_tensor()\n"
            "    def __call__(self, prompt):\n        if not prompt:\n            raise ValueError('empty prompt')\n"
            "model = _Model()")
    capsys.readouterr()
    result = run(ip, 'model("")')
    assert isinstance(result.error_in_exec, ValueError)
    out = "".join(capsys.readouterr())
    assert "cleared" not in out, out
    frames = [tb.tb_frame for tb in _walk(ip.last_execution_result.error_in_exec.__traceback__)]
    assert any(f.f_code.co_name == "__call__" and "self" in f.f_locals for f in frames)  # %debug still sees it
    who = str(ip.run_line_magic("vram", "who"))
    assert "model.weight" in who and "traceback:" not in who and "last traceback 0 B" in who
    run(ip, "del model, _Model")
    del ip.user_ns["_fake_cuda_tensor"], frames
    gc.collect()
    assert not all_dead(refs)  # as in plain IPython, the stored traceback (what %debug reads) still holds it
    from mlnb.monitor import clear_frames

    clear_frames(result.error_in_exec.__traceback__)  # what mlnb does when the frames alone pin GPU memory
    gc.collect()
    assert all_dead(refs)
    gpu.empty_cache()  # freed outside a cell: no cell's cleanup gave the cached block back
    assert_state_after(ip, gpu)


def _walk(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def test_reload_ext_ten_times_keeps_the_pipeline_and_one_set_of_hooks(ip, gpu, sd, capsys, monkeypatch):
    for _ in range(10):
        ip.run_line_magic("reload_ext", "mlnb")
    capsys.readouterr()
    assert cached_pipelines() == [sd]
    # A cell that uses the GPU gets exactly one per-cell line: ten stacked monitors would print ten.
    ip.user_ns["_fake_cuda_tensor"] = lambda: device_tensor(gpu, 16 * MiB)
    assert run(ip, "_t = _fake_cuda_tensor(); del _t").success
    out = capsys.readouterr().out
    assert out.count("[mlnb] cell ") == 1 and "freed when idle" in out
    assert run(ip, f"%%generate {GEN} --seed 6\na fox").success
    assert cached_pipelines() == [sd]
    assert_state_after(ip, gpu, keeps=[sd], remembered=sd.model)
    del ip.user_ns["_fake_cuda_tensor"]


def test_reloading_or_unloading_the_extension_in_a_cell_leaves_no_monitor_open(ip, gpu, capsys):
    """The monitor ``pre_run_cell`` opened for the cell that unloads the extension never reaches ``post_run_cell``;
    left open, it would fold every later monitor's peaks into itself for good."""
    import mlnb.monitor.memory_monitor as monitor_mod

    for _ in range(3):
        assert run(ip, "%reload_ext mlnb").success
    assert monitor_mod._open == []
    assert run(ip, "%unload_ext mlnb").success
    assert monitor_mod._open == []
    assert run(ip, "%load_ext mlnb").success
    assert monitor_mod._open == []


def test_vram_free_while_a_dashboard_is_live(ip, gpu, sd, capsys):
    pytest.importorskip("ipywidgets")
    widgets = pytest.importorskip("mlnb.widgets")
    board = mlnb.dashboard(interval=0.02)
    try:
        assert board.running and board.refresh().loaded != "none"
        report = ip.run_line_magic("vram", "free")
        assert report.unloaded == 1 and cached_pipelines() == [] and not sd.loaded
        time.sleep(0.1)  # several updater ticks after the unload
        assert board.running, "the dashboard's updater died when the pipelines were freed"
        assert board.refresh().loaded == "none" and "loaded: none" in board.level_info.value
        assert run(ip, "z = 3").success
        assert (gpu.allocated, gpu.reserved) == (0, 0)
    finally:
        board.close()
    assert not board.running and board not in widgets.panel.live_dashboards()


def test_keyboard_interrupt_while_loading_frees_the_parts_loaded(ip, gpu, fresh, tiny_sd, capsys, monkeypatch):
    def interrupt(folder):
        raise KeyboardInterrupt

    loaded = on_component_load(monkeypatch, second=interrupt)
    defaults.model = None
    text = failing_cell(ip, f"%%generate --model {tiny_sd} --level none {GEN}\na fox", capsys)
    assert text == f"UsageError: loading {str(tiny_sd)!r} was interrupted; its memory was freed and nothing was cached"
    assert len(loaded) == 1 and loaded[0]() is None, "the interrupted load still holds the component it had loaded"
    assert cached_pipelines() == [] and defaults.model is None
    assert_state_after(ip, gpu)


@pytest.mark.parametrize("torch_row, warned", [
    ("2.13.0+cpu (CUDA CPU build)", True),
    ("2.5.1+cu121 (CUDA 12.1)", False),   # a local build of the pinned release is that release
    ("2.5.10 (CUDA 12.1)", True),         # not 2.5.1, though it starts with it
])
def test_doctor_warns_when_xformers_was_built_for_another_torch(monkeypatch, torch_row, warned):
    from importlib import metadata

    from mlnb.cli import _known_bad

    real = metadata.requires
    monkeypatch.setattr(metadata, "requires", lambda name: (
        ["numpy", "torch==2.5.1; platform_system == 'Linux'"] if name == "xformers" else real(name)))
    warnings = _known_bad([("torch", torch_row), ("xformers", "0.0.28.post3")])
    assert [w for w in warnings if "xformers" in w] == (
        [f"xformers 0.0.28.post3 was built for torch ==2.5.1, this is torch {torch_row.split(' ')[0]}"] if warned else []
    )


def test_doctor_warns_about_a_diffusers_older_than_the_oldest_supported(monkeypatch):
    import diffusers

    from mlnb.cli import _known_bad

    monkeypatch.setattr(diffusers, "__version__", "0.38.2")
    assert _known_bad([]) == ["diffusers 0.38.2 is older than 0.39, the oldest mlnb supports"]
    monkeypatch.setattr(diffusers, "__version__", "0.100.0.dev0")
    assert _known_bad([]) == []
