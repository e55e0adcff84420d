"""LoRAs on tiny pipelines (CPU): the spec as typed, the file found and checked before it touches a pipeline, and
the unfused adapter set: a LoRA changes the image, scale 0 gives the base image, two combine, clearing restores the
base weights bit-exactly, switching reads no base weight; and the same with the memory techniques that run on a CPU.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from mlnb.device import CpuDevice
from mlnb.errors import (
    InvalidArgumentError,
    ModelLoadError,
    ModelNotFoundError,
    OfflineError,
    UnsafeWeightsError,
    UnsupportedPipelineError,
)
from mlnb.levels import MemoryOptimizationConfig
from mlnb.optimizer import MemoryOptimizer
from mlnb.pipeline.adapters import active_loras, adapter_bytes, set_loras
from mlnb.pipeline.loras import LoraSpec, parse_loras, resolve_lora
from mlnb.testing import tiny_lora

pytestmark = pytest.mark.usefixtures("frozen_heap")


@pytest.fixture(scope="module")
def loras(tiny_sd, tiny_sdxl, tmp_path_factory):
    """Tiny LoRA files: two for SD (``a`` also adapts the text encoder), ``a`` again as pickle, and for SDXL one with
    both text encoders and one of the UNet alone."""
    root = tmp_path_factory.mktemp("loras")
    return {
        "a": tiny_lora(tiny_sd, root / "a", seed=1, text_encoder=True),
        "b": tiny_lora(tiny_sd, root / "b", seed=2),
        "a_pickle": tiny_lora(tiny_sd, root / "a-pickle", seed=1, text_encoder=True, pickle=True),
        "xl": tiny_lora(tiny_sdxl, root / "xl", seed=3, text_encoder=True),
        "xl_unet": tiny_lora(tiny_sdxl, root / "xl-unet", seed=4),
    }


def load(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe) -> np.ndarray:
    # guidance 1: one UNet batch instead of two; the prompt still goes through the text encoder(s)
    out = pipe("a fox", num_inference_steps=2, width=64, height=64, guidance_scale=1.0, output_type="np",
               generator=torch.Generator("cpu").manual_seed(0))
    return out.images[0]


def snapshot(pipe) -> dict:
    """Every parameter and buffer of every component, by name: the tensor object and a copy of its values."""
    return {
        f"{name}.{key}": (tensor, tensor.detach().clone())
        for name, component in pipe.components.items() if isinstance(component, torch.nn.Module)
        for key, tensor in component.state_dict(keep_vars=True).items()
    }


def assert_same_weights(pipe, before: dict) -> None:
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    for key, (tensor, values) in before.items():
        now = after[key][0]
        assert now is tensor, key
        assert torch.equal(now.view(torch.uint8), values.view(torch.uint8)), key  # bit-exact, fp8 included


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text and text
    return text


# ---------------------------------------------------------------------------------------------------------------
# The spec as typed


@pytest.mark.parametrize("value, source, scale", [
    ("ink.safetensors", "ink.safetensors", 1.0),
    ("ink.safetensors:0.5", "ink.safetensors", 0.5),
    (("ink.safetensors", 2), "ink.safetensors", 2.0),
    ("org/ink-lora:-0.25", "org/ink-lora", -0.25),
    ("org/ink-lora", "org/ink-lora", 1.0),
    (r"C:\loras\ink.safetensors", r"C:\loras\ink.safetensors", 1.0),
    (r"C:\loras\ink.safetensors:0.3", r"C:\loras\ink.safetensors", 0.3),
    ("C:0.5", "C:0.5", 1.0),  # a drive-relative path, not a LoRA named C
    ("/runs/step:2/ink.safetensors", "/runs/step:2/ink.safetensors", 1.0),
    (" ink.safetensors:1e-1 ", "ink.safetensors", 0.1),
])
def test_a_spec_parses_once_from_a_path_a_tuple_or_the_magic_form(value, source, scale):
    spec = LoraSpec.parse(value)
    assert (spec.source, spec.scale) == (source, scale)
    assert LoraSpec.parse(str(spec)) == spec  # prints back as the magic takes it


def test_an_existing_path_with_a_colon_and_a_number_is_a_path(tmp_path):
    weird = tmp_path / "ink:2"
    weird.write_bytes(b"")
    assert LoraSpec.parse(str(weird)) == LoraSpec(str(weird), 1.0)
    assert LoraSpec.parse(weird) == LoraSpec(str(weird), 1.0)  # os.PathLike


@pytest.mark.parametrize("value, says", [
    ("ink.safetensors:nan", "finite number, got 'nan'"),
    ("ink.safetensors:inf", "finite number, got 'inf'"),
    ("ink.safetensors:-1e999", "finite number"),
    ("ink.safetensors:strong", "after ':' must be a finite number, got 'strong'"),
    (("ink.safetensors", float("inf")), "finite number"),
    (("ink.safetensors", "0.5"), "scale must be a number, got '0.5'"),
    (("ink.safetensors", True), "scale must be a number, got True"),
    (("ink.safetensors", 1, 2), "(path, scale)"),
    ("", "a LoRA is a file, a folder or a hub id"),
    (3, "got int 3"),
])
def test_a_bad_spec_or_scale_is_one_line(value, says):
    with pytest.raises(InvalidArgumentError) as info:
        LoraSpec.parse(value)
    assert says in one_line(info)


def test_a_loras_argument_is_none_one_lora_or_a_list_without_repeats():
    assert parse_loras(None) == parse_loras([]) == ()
    assert parse_loras("a.safetensors") == (LoraSpec("a.safetensors"),)
    assert parse_loras(("a.safetensors", 0.5)) == (LoraSpec("a.safetensors", 0.5),)
    assert parse_loras(["a.safetensors", ("b.safetensors", 0.5), "c.safetensors:2"]) == (
        LoraSpec("a.safetensors"), LoraSpec("b.safetensors", 0.5), LoraSpec("c.safetensors", 2.0))
    with pytest.raises(InvalidArgumentError, match="'a.safetensors' is given twice"):
        parse_loras(["a.safetensors", "a.safetensors:0.5"])


# ---------------------------------------------------------------------------------------------------------------
# Finding the file


def test_a_folder_holding_one_weights_file_resolves_to_it_and_others_are_one_line(loras, tmp_path):
    folder = loras["b"].parent
    assert resolve_lora(LoraSpec(str(folder))).path == loras["b"]
    assert resolve_lora(LoraSpec(str(loras["b"]))).path == loras["b"]
    two = tmp_path / "two"
    two.mkdir()
    for name in ("x.safetensors", "y.safetensors"):
        shutil.copy(loras["b"], two / name)
    cases = [
        (str(two), InvalidArgumentError, "holds 2 weights files (x.safetensors, y.safetensors): give the file"),
        (str(tmp_path / "empty"), ModelNotFoundError, "no LoRA file or folder at"),
        (str(tmp_path / "missing.safetensors"), ModelNotFoundError, "no LoRA file or folder at"),
        ("just-a-name", ModelNotFoundError, "no LoRA file or folder at 'just-a-name'"),
    ]
    (tmp_path / "empty").mkdir()
    cases[1] = (str(tmp_path / "empty"), ModelNotFoundError, "holds no .safetensors file")
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights")
    cases.append((str(notes), InvalidArgumentError, "is not a weights file"))
    for source, error, says in cases:
        with pytest.raises(error) as info:
            resolve_lora(LoraSpec(source))
        assert says in one_line(info), source


def test_a_pickle_lora_is_refused_unless_allowed_and_then_gives_the_same_image(tiny_sd, loras):
    for source in (loras["a_pickle"], loras["a_pickle"].parent):
        with pytest.raises(UnsafeWeightsError) as info:
            resolve_lora(LoraSpec(str(source)))
        assert "pickle can run code when loaded: pass allow_pickle=True" in one_line(info)
        assert resolve_lora(LoraSpec(str(source)), allow_pickle=True).pickle
    pipe = load(tiny_sd)
    set_loras(pipe, [loras["a"]])
    safe = image(pipe)
    with pytest.raises(UnsafeWeightsError):
        set_loras(pipe, [loras["a_pickle"]])
    set_loras(pipe, [loras["a_pickle"]], allow_pickle=True)
    assert np.array_equal(image(pipe), safe)


def test_a_kohya_file_gives_the_image_of_the_same_lora_in_diffusers_format(tiny_sd, loras, tmp_path):
    """The other common format (``lora_unet_...``, ``lora_te_text_model_...`` and an alpha per module), text
    encoder included, whose ``text_model`` level a transformers 5 CLIP has not."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    kohya = convert_state_dict_to_kohya(load_file(loras["a"]))
    assert any(k.startswith("lora_te1_text_model_") for k in kohya) and any(k.endswith(".alpha") for k in kohya)
    save_file(kohya, tmp_path / "kohya.safetensors")
    pipe = load(tiny_sd)
    set_loras(pipe, [loras["a"]])
    reference = image(pipe)
    (applied,) = set_loras(pipe, [tmp_path / "kohya.safetensors"])
    assert set(applied.components) == {"unet", "text_encoder"}
    assert np.abs(image(pipe) - reference).max() < 1e-5


def test_a_hub_id_is_found_in_the_cache_and_offline_without_it_is_one_line(loras, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError) as info:
        resolve_lora(LoraSpec("someone/ink-lora"))
    assert "'someone/ink-lora' is neither a local file nor in the Hugging Face cache" in one_line(info)
    calls = []

    def cached(repo, allow_patterns, local_files_only=False):
        calls.append((repo, local_files_only, tuple(allow_patterns)))
        return str(loras["b"].parent)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    assert resolve_lora(LoraSpec("someone/ink-lora", 0.5)).path == loras["b"]
    assert calls == [("someone/ink-lora", True, ("*.safetensors",))]  # the cache first, safetensors only


def test_a_hub_that_cannot_be_reached_is_an_offline_error(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(repo, allow_patterns, local_files_only=False):
        raise (FileNotFoundError if local_files_only else ConnectionError)("Max retries exceeded\nwith url ...")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(OfflineError) as info:
        resolve_lora(LoraSpec("someone/ink-lora"))
    assert "cannot reach the Hugging Face Hub for LoRA 'someone/ink-lora'" in one_line(info)


# ---------------------------------------------------------------------------------------------------------------
# Reading and checking before the pipeline is touched


def test_a_corrupt_file_another_architecture_or_no_lora_is_one_line_and_the_pipeline_keeps_its_loras(
        tiny_sd, loras, tmp_path):
    from safetensors.torch import save_file

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    model = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4)}, model)
    pipe = load(tiny_sd)
    set_loras(pipe, [loras["a"], (loras["b"], 0.5)])
    before = image(pipe)
    applied = active_loras(pipe)
    cases = [
        (corrupt, "could not read LoRA"),
        (model, "is not a LoRA: its key 'conv_in.weight' names no LoRA layer"),
        (loras["xl"], "does not fit this StableDiffusionPipeline: "),
    ]
    for source, says in cases:
        with pytest.raises(ModelLoadError) as info:
            set_loras(pipe, [loras["a"], source])
        text = one_line(info)
        assert says in text and str(source) in text
        assert active_loras(pipe) == applied
        assert np.array_equal(image(pipe), before)
    assert "its key 'text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight' is for a " \
           "'text_encoder_2', which this pipeline has not" in str(info.value)
    # in a component the pipeline has, the first module that does not fit is named, with both shapes
    with pytest.raises(ModelLoadError, match=r"attn2\.to_k takes 32→64 features, the LoRA's A and B are \(4, 64\)"):
        set_loras(pipe, [loras["xl_unet"]])


def test_a_failure_while_loading_takes_the_new_adapters_out_and_keeps_the_old_set(tiny_sd, loras, monkeypatch):
    pipe = load(tiny_sd)
    set_loras(pipe, [loras["a"]])
    before, names = image(pipe), pipe.get_list_adapters()
    real = pipe.load_lora_weights

    def fails_after_loading(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("disk went away\nsecond line")

    monkeypatch.setattr(pipe, "load_lora_weights", fails_after_loading)
    with pytest.raises(ModelLoadError) as info:
        set_loras(pipe, [loras["a"], loras["b"]])
    assert f"could not apply LoRA '{loras['b']}': RuntimeError: disk went away" == one_line(info)
    assert pipe.get_list_adapters() == names
    assert np.array_equal(image(pipe), before)


# ---------------------------------------------------------------------------------------------------------------
# Applying, combining, switching and clearing


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_a_lora_changes_the_image_scale_zero_is_the_base_two_combine_and_clearing_is_bit_exact(request, kind, loras):
    pipe = load(request.getfixturevalue(f"tiny_{kind}"))
    base, weights = image(pipe), snapshot(pipe)
    first, second = (loras["a"], loras["b"]) if kind == "sd" else (loras["xl"], loras["xl_unet"])

    (applied,) = set_loras(pipe, [first])
    one = image(pipe)
    assert np.abs(one - base).max() > 0.01
    assert set(applied.components) == ({"unet", "text_encoder"} if kind == "sd" else
                                       {"unet", "text_encoder", "text_encoder_2"})
    set_loras(pipe, [(first, 0.0)])
    assert np.array_equal(image(pipe), base)
    set_loras(pipe, [first, (second, 0.0)])
    assert np.array_equal(image(pipe), one)  # the second at 0 adds nothing to the first
    set_loras(pipe, [first, second])
    both = image(pipe)
    set_loras(pipe, [second])
    assert np.abs(both - one).max() > 0.01 and np.abs(both - image(pipe)).max() > 0.01
    assert [a.spec.source for a in active_loras(pipe)] == [str(second)]

    assert set_loras(pipe, []) == () and active_loras(pipe) == ()
    assert pipe.get_list_adapters() == {}
    assert_same_weights(pipe, weights)
    assert np.array_equal(image(pipe), base)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_transformer_lora_changes_the_image_scale_zero_is_the_base_and_clearing_is_bit_exact(request, kind,
                                                                                                 tmp_path):
    """SD3's and Flux's loaders hand back the state dict alone (the UNet pipelines' give a tuple): the LoRA is
    checked, applied to the transformer's attention and cleared as for a UNet."""
    folder = request.getfixturevalue(f"tiny_{kind}")
    lora = tiny_lora(folder, tmp_path / "lora", seed=5)
    pipe = load(folder)
    base, weights = image(pipe), snapshot(pipe)

    (applied,) = set_loras(pipe, [lora])
    assert set(applied.components) == {"transformer"}
    one = image(pipe)
    assert np.abs(one - base).max() > 0.01
    set_loras(pipe, [(lora, 0.0)])
    assert np.array_equal(image(pipe), base)
    assert set_loras(pipe, []) == () and active_loras(pipe) == ()
    assert_same_weights(pipe, weights)
    assert np.array_equal(image(pipe), base)


def test_switching_reads_no_base_weight_and_keeps_the_adapters_it_keeps(tiny_sd, loras, tmp_path, monkeypatch):
    import safetensors.torch

    model = shutil.copytree(tiny_sd, tmp_path / "model")
    pipe = load(model)
    base = image(pipe)
    shutil.rmtree(model)  # the base weights are gone from disk
    read = []
    real = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda path, *a, **k: read.append(path) or real(path, *a, **k))

    set_loras(pipe, [loras["a"]])
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    kept = layer.lora_A[active_loras(pipe)[0].adapter_name]
    set_loras(pipe, [(loras["a"], 0.5), loras["b"]])
    assert layer.lora_A[active_loras(pipe)[0].adapter_name] is kept  # weighted anew, not read again
    set_loras(pipe, [loras["b"]])
    set_loras(pipe, [])
    assert [os.fspath(p) for p in read] == [str(loras["a"]), str(loras["b"])]
    assert np.array_equal(image(pipe), base)


def test_the_bytes_of_the_active_adapters_are_known(tiny_sd, loras):
    from safetensors.torch import load_file

    pipe = load(tiny_sd)
    applied = set_loras(pipe, [loras["a"], loras["b"]])
    for lora, file in zip(applied, (loras["a"], loras["b"])):
        stored = sum(t.numel() * t.element_size() for t in load_file(file).values())  # fp32 file, fp32 pipeline
        assert lora.nbytes == stored == adapter_bytes(pipe, lora.adapter_name) > 0
    assert adapter_bytes(pipe, "no-such-adapter") == 0


# ---------------------------------------------------------------------------------------------------------------
# The memory techniques


@pytest.mark.parametrize("level", ["none", "balanced", "aggressive", "ultra"])
def test_loras_apply_at_every_level_on_the_cpu_and_clear_exactly(tiny_sd, loras, level):
    """On a CPU the levels apply VAE tiling and slicing and, at ultra, fp8 storage: the LoRA changes the image as
    it does without them (fp8 within its own error), and clearing gives the level's base weights and image."""
    plain = load(tiny_sd)
    plain_base = image(plain)
    set_loras(plain, [loras["a"]])
    plain_effect = image(plain) - plain_base

    pipe = load(tiny_sd)
    report = MemoryOptimizer(MemoryOptimizationConfig.from_level(level), CpuDevice()).optimize_pipeline(pipe)
    base, weights = image(pipe), snapshot(pipe)
    set_loras(pipe, [loras["a"]])
    effect = image(pipe) - base
    fp8 = report.is_applied("fp8_storage")
    assert fp8 is (level == "ultra")
    assert np.abs(effect - plain_effect).max() < (0.05 if fp8 else 1e-5)
    set_loras(pipe, [])
    assert_same_weights(pipe, weights)
    assert np.array_equal(image(pipe), base)


def test_with_fp8_storage_the_adapters_compute_in_the_compute_dtype_with_the_file_s_values(tiny_sd, loras):
    """peft makes an adapter in its base layer's dtype, fp8 at rest: the adapters get the compute dtype and the
    exact values of the file, and the base layer keeps its fp8 copy."""
    from safetensors.torch import load_file

    from mlnb.optimizer.precision import store_fp8

    pipe = load(tiny_sd)
    store_fp8(pipe.unet)
    (applied,) = set_loras(pipe, [loras["b"]])
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    stored = load_file(loras["b"])["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    adapter = layer.lora_A[applied.adapter_name].weight
    assert adapter.dtype == torch.float32 and torch.equal(adapter, stored)
    assert layer.base_layer.weight.dtype == torch.float8_e4m3fn
    image(pipe)  # computes (an fp8 adapter does not on a CPU)


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_loras_under_group_offloading_give_the_same_image(tiny_sd, loras, fp8):
    """diffusers takes its group hooks off and puts them back around the adapters (onload on the CPU here)."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    from mlnb.optimizer.precision import store_fp8

    def prepared(group: bool):
        pipe = load(tiny_sd)
        if fp8:
            store_fp8(pipe.unet)
        if group:
            try:
                pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type="leaf_level")
            except AttributeError as exc:  # diffusers 0.39 looks up torch.accelerator's device type, None here
                pytest.skip(f"this diffusers' group offloading needs an accelerator ({exc})")
        return pipe

    reference = prepared(group=False)
    set_loras(reference, [loras["a"], loras["b"]])
    pipe = prepared(group=True)
    base = image(pipe)
    set_loras(pipe, [loras["a"], loras["b"]])
    assert _is_group_offload_enabled(pipe.unet)
    assert np.array_equal(image(pipe), image(reference))
    set_loras(pipe, [])
    assert np.array_equal(image(pipe), base)


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_loras_under_model_offload_keep_the_hooks(tiny_sd, loras, monkeypatch, fp8):
    """load_lora_weights takes the accelerate hooks off and enables model offload again with no device, which on a
    CUDA machine is the card; here the pipeline's own call is pointed at the CPU it was enabled on. The fp8 repair
    of the adapters takes them off and puts them back the same way."""
    import functools

    from mlnb.optimizer.precision import store_fp8

    reference = load(tiny_sd)
    pipe = load(tiny_sd)
    if fp8:
        store_fp8(reference.unet)
        store_fp8(pipe.unet)
    set_loras(reference, [loras["a"]])
    pipe.enable_model_cpu_offload(device="cpu")
    monkeypatch.setattr(pipe, "enable_model_cpu_offload",
                        functools.partial(type(pipe).enable_model_cpu_offload, pipe, device="cpu"))
    set_loras(pipe, [loras["a"]])
    assert hasattr(pipe.unet, "_hf_hook") and hasattr(pipe.text_encoder, "_hf_hook")
    assert np.array_equal(image(pipe), image(reference))


def test_a_streamed_lora_component_gets_its_adapters_packed_into_its_units_and_clears_exactly(tiny_sd, loras):
    """diffusers would take mlnb's streaming hooks (named as group offloading's) for its own and fail to apply them
    again: set_loras takes the streamer off, changes the adapters and streams the same units again, the adapters
    packed beside their base weights; the image is the resident pipeline's, and clearing gives the base image."""
    from mlnb.device import CopyStreams
    from mlnb.planner import module_streamer, stream_units
    from mlnb.planner.blocks import denoiser_units

    reference = load(tiny_sd)
    set_loras(reference, [loras["a"]])
    styled = image(reference)
    pipe = load(tiny_sd)
    names = [n for n, _ in denoiser_units(pipe.unet, 50_000)]
    stream_units(pipe.unet, names, torch.device("cpu"), CopyStreams())
    base = image(pipe)
    set_loras(pipe, [loras["a"]])
    streamer = module_streamer(pipe.unet)
    assert streamer is not None and sorted(streamer.units) == sorted(names)
    packed = {n: p for u in streamer.units.values() for n, p in u.module.named_parameters() if "lora_" in n}
    assert packed  # the adapters of the streamed units are among the units' packed weights
    assert np.array_equal(image(pipe), styled)
    set_loras(pipe, [])
    assert np.array_equal(image(pipe), base) and module_streamer(pipe.unet) is not None


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["fp16", "fp8"])
@pytest.mark.parametrize("offload", ["model", "sequential", "group"])
def test_loras_under_each_offload_on_a_gpu_give_the_resident_image(tiny_sd, loras, offload, fp8):
    from mlnb.optimizer.precision import store_fp8

    def fp16():
        pipe = load(tiny_sd).to(torch.float16)
        if fp8:
            store_fp8(pipe.unet)
        return pipe

    pipe = fp16().to("cuda")
    base = image(pipe)
    set_loras(pipe, [loras["a"], loras["b"]])
    resident = image(pipe)
    set_loras(pipe, [])
    assert np.array_equal(image(pipe), base)

    pipe = fp16()
    if offload == "model":
        pipe.enable_model_cpu_offload()
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload()
    else:
        pipe.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                  offload_type="leaf_level", use_stream=True)
    set_loras(pipe, [loras["a"], loras["b"]])
    assert np.abs(image(pipe) - resident).max() < 1e-2
    set_loras(pipe, [])
    assert np.abs(image(pipe) - base).max() < 1e-2

