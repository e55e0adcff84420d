"""Loading from the safetensors mapping: components whose files hold another dtype are cast as they are placed, part
by part, and give the same pipeline (dtypes, images) as diffusers' own cast at load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlnb.planner import CardFacts, Workload, plan_for_budget


@pytest.fixture(scope="module")
def tiny_sdxl_fp16(tiny_sdxl, tmp_path_factory):
    """The tiny SDXL pipeline saved in fp16: read as fp32, its casts are deferred."""
    from diffusers import DiffusionPipeline

    folder = tmp_path_factory.mktemp("fp16") / "tiny-sdxl-fp16"
    DiffusionPipeline.from_pretrained(tiny_sdxl).to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return folder


def _dtypes(pipe) -> dict[str, torch.dtype]:
    return {f"{name}.{key}": t.dtype for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
            for key, t in list(module.named_parameters()) + list(module.named_buffers())}


def test_the_files_dtype_is_read_from_the_safetensors_headers(tiny_sdxl, tiny_sdxl_fp16):
    from mlnb.pipeline.mapped import dtypes_to_defer, safetensors_dtype

    assert safetensors_dtype(tiny_sdxl_fp16 / "unet") == torch.float16
    assert safetensors_dtype(tiny_sdxl / "unet") == torch.float32
    assert safetensors_dtype(tiny_sdxl_fp16 / "scheduler") is None  # no weights
    assert set(dtypes_to_defer(tiny_sdxl_fp16, torch.float32)) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert dtypes_to_defer(tiny_sdxl_fp16, torch.float16) == {}
    assert "unet" not in dtypes_to_defer(tiny_sdxl_fp16, torch.float32, given={"unet": None})


def test_deferred_weights_are_placeholders_of_the_dtype_asked_for(tiny_sdxl_fp16):
    from diffusers import DiffusionPipeline

    from mlnb.pipeline.mapped import materialize_all, read_pipeline
    from mlnb.planner.deferred import deferred_bytes, is_deferred

    reference = DiffusionPipeline.from_pretrained(tiny_sdxl_fp16, torch_dtype=torch.float32)
    pipe = read_pipeline(tiny_sdxl_fp16, torch.float32)
    assert is_deferred(pipe.unet) and pipe.unet.device.type == "meta"
    assert deferred_bytes(pipe.unet) == sum(t.numel() * 4 for t in pipe.unet.parameters())
    assert _dtypes(pipe) == _dtypes(reference)  # the plan sees the model as it will be placed
    assert materialize_all(pipe) > 0 and not is_deferred(pipe.unet)
    assert _dtypes(pipe) == _dtypes(reference)
    for (name, mine), theirs in zip(pipe.unet.state_dict().items(), reference.unet.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_tied_weights_stay_tied_where_they_are_placed():
    from mlnb.planner.deferred import defer, materialize

    shared = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.float16), requires_grad=False)
    model = torch.nn.Sequential(torch.nn.Embedding(4, 3), torch.nn.Linear(3, 4, bias=False))
    model[0].weight, model[1].weight = shared, shared
    defer(model, lambda name, t: torch.float32)
    assert model[0].weight is model[1].weight and model[0].weight.dtype == torch.float32
    materialize(model[1], "cpu")  # one part first: the other finds the same tensor
    materialize(model, "cpu")
    assert model[0].weight is model[1].weight and model[0].weight.device.type == "cpu"


def test_a_plan_applied_on_cpu_casts_on_the_way_and_gives_the_same_image(tiny_sdxl_fp16, monkeypatch):
    """The kept part, the streamed units, the streamed encoders and the pinned VAE are each cast as they are placed;
    the image is the one of the pipeline diffusers cast at load."""
    from diffusers import DiffusionPipeline

    from fakes import generate_64 as run, tiny_stream_budget
    from mlnb.pipeline.mapped import read_pipeline
    from mlnb.planner import apply_plan, model_facts
    from mlnb.planner.deferred import is_deferred

    reference_pipe = DiffusionPipeline.from_pretrained(tiny_sdxl_fp16, torch_dtype=torch.float32)
    reference = run(reference_pipe)
    pipe = read_pipeline(tiny_sdxl_fp16, torch.float32)
    budget = tiny_stream_budget(pipe, monkeypatch)
    plan = plan_for_budget(budget, model_facts(pipe, max_block=200_000), CardFacts(), Workload(64, 64, 1, 2))
    assert plan.strategy == "stream" and plan.streamed and plan.offload_encoders_vae
    apply_plan(pipe, plan, "cpu", use_stream=False)
    assert not any(is_deferred(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    assert _dtypes(pipe) == _dtypes(reference_pipe)
    assert np.array_equal(run(pipe), reference)


def test_load_pipeline_casts_a_pipeline_no_plan_places_and_generates_the_same_image(tiny_sdxl_fp16, clean_cache):
    """On a CPU a budget's plan is shown, not applied: the deferred casts run on the host before it is used."""
    from diffusers import DiffusionPipeline

    import mlnb
    from fakes import generate_64 as run
    from mlnb.planner.deferred import is_deferred

    reference = run(DiffusionPipeline.from_pretrained(tiny_sdxl_fp16, torch_dtype=torch.float32))
    managed = mlnb.load_pipeline(tiny_sdxl_fp16, budget="1GiB")
    assert not is_deferred(managed.pipe.unet) and managed.pipe.unet.dtype == torch.float32
    assert np.array_equal(run(managed.pipe), reference)
