"""``mlnb bench``: pure planning and reporting, one recipe in-process, and the CPU harness end to end in subprocesses.

The numbers of a CPU run mean nothing; these tests check that the harness measures, isolates, reports OOM as OOM
and writes complete JSON. The GPU figures come from ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

from mlnb.bench import main, report
from mlnb.bench.models import ARCHS, arch_params, folder_native_size, load_arch, native_size
from mlnb.bench.recipes import BASELINE, RECIPES, parse_recipes
from mlnb.bench.runner import RunSpec, parse_caps, plan_runs, run_job
from mlnb.device import CudaDevice
from mlnb.testing import FakeDevice, FakeOutOfMemoryError
from mlnb.units import GiB, MiB

RUN_FIELDS = (
    "model", "recipe", "cap_bytes", "steps", "width", "height", "status", "phase", "error", "level", "detail",
    "device", "card", "seconds", "warmup_seconds", "load_seconds", "peak_allocated", "peak_reserved", "nvml_peak",
    "nvml_baseline", "host_rss_peak", "host_rss_baseline", "params", "fp16_weight_bytes", "denoiser_fp16_bytes",
    "resident_after_load", "ratio", "floor_seconds", "wall_seconds",
)


def _row(**kw) -> dict:
    row = dict(
        model="sdxl", recipe="mlnb-auto", cap_bytes=4 * GiB, steps=8, width=1024, height=1024, status="ok",
        phase=None, error=None, level="ultra", seconds=2.0, peak_allocated=3 * GiB, peak_reserved=int(3.5 * GiB),
        nvml_peak=4 * GiB, host_rss_peak=8 * GiB, fp16_weight_bytes=7 * GiB, denoiser_fp16_bytes=5 * GiB,
    )
    row.update(kw)
    return row


def _baseline(**kw) -> dict:
    return _row(recipe=BASELINE, cap_bytes=None, level=None, seconds=1.0, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Pure: architectures, recipes, caps, planning


def test_arch_configs_are_the_public_models_shapes():
    """The packaged configs carry the public parameter counts and native sizes."""
    assert ARCHS == ("sd15", "sdxl", "sd35-medium", "sd35-large", "flux-dev")
    assert arch_params("sdxl")["unet"] == 2567463684
    assert arch_params("sd15")["unet"] == 859520964
    assert load_arch("sdxl")["unet"]["cross_attention_dim"] == 2048
    assert (native_size("sd15"), native_size("sdxl")) == (512, 1024)
    assert {native_size(name) for name in ("sd35-medium", "sd35-large", "flux-dev")} == {1024}
    with pytest.raises(ValueError, match="unknown architecture 'sd3'"):
        load_arch("sd3")


# The public models' sizes as published (model cards, papers): what the stored configs must build, within 1%.
_PUBLIC_PARAMS = {
    "sd35-medium": {"transformer": 2.24e9, "vae": 83.8e6, "text_encoder": 123e6, "text_encoder_2": 695e6,
                    "text_encoder_3": 4.76e9},
    "sd35-large": {"transformer": 8.06e9, "vae": 83.8e6, "text_encoder": 123e6, "text_encoder_2": 695e6,
                   "text_encoder_3": 4.76e9},
    "flux-dev": {"transformer": 11.9e9, "vae": 83.8e6, "text_encoder": 123e6, "text_encoder_2": 4.76e9},
}


@pytest.mark.parametrize("name", list(_PUBLIC_PARAMS))
def test_transformer_archs_build_on_meta_with_the_public_parameter_counts(name):
    """SD3.5 medium (MMDiT-X: dual attention in blocks 0-12), SD3.5 large and FLUX.1-dev (19 double-stream + 38
    single-stream blocks), with CLIP and T5-XXL encoders, built on the meta device from the stored configs: each
    component has its stored ``_params`` (T5's input embedding counted once), and those are the published sizes."""
    from mlnb.bench.models import build_arch_pipeline

    pipe = build_arch_pipeline(name, device="meta")
    counted = {key: sum(p.numel() for p in module.parameters())
               for key, module in pipe.components.items() if hasattr(module, "parameters")}
    assert counted == arch_params(name)
    for key, public in _PUBLIC_PARAMS[name].items():
        assert counted[key] == pytest.approx(public, rel=0.01), key
    assert all(p.is_meta for p in pipe.transformer.parameters())
    assert type(pipe).__name__ == load_arch(name)["_classes"]["pipeline"].split(".")[1]
    blocks = pipe.transformer.transformer_blocks
    if name == "flux-dev":
        assert (len(blocks), len(pipe.transformer.single_transformer_blocks)) == (19, 38)
        assert type(pipe.tokenizer_2).__name__ in ("T5Tokenizer", "T5TokenizerFast")
    else:
        assert len(blocks) == {"sd35-medium": 24, "sd35-large": 38}[name]
        dual = [i for i, block in enumerate(blocks) if getattr(block, "attn2", None) is not None]
        assert dual == (list(range(13)) if name == "sd35-medium" else [])
        assert type(pipe.tokenizer_3).__name__ in ("T5Tokenizer", "T5TokenizerFast")
    assert "_note" in load_arch(name) and "huggingface/diffusers" in load_arch(name)["_note"]


def test_parse_recipes_accepts_families_names_and_bare_levels():
    assert [r.name for r in parse_recipes(None)] == list(RECIPES)
    assert [r.name for r in parse_recipes("diffusers")] == [n for n in RECIPES if n.startswith("diffusers-")]
    assert [r.name for r in parse_recipes("ultra,diffusers-none,ultra")] == ["mlnb-ultra", "diffusers-none"]
    with pytest.raises(ValueError, match="unknown recipe 'turbo'"):
        parse_recipes("turbo")


def test_parse_caps_per_model_and_for_all():
    assert parse_caps("sdxl:4,sdxl:15,sd15:2", ["sd15", "sdxl"]) == {"sd15": [2 * GiB], "sdxl": [4 * GiB, 15 * GiB]}
    assert parse_caps("none,4", ["sd15", "sdxl"]) == {"sd15": [None, 4 * GiB], "sdxl": [None, 4 * GiB]}
    assert parse_caps("sdxl:4", ["sd15", "sdxl"]) == {"sd15": [None], "sdxl": [4 * GiB]}
    assert parse_caps("0.5", ["m"]) == {"m": [512 * MiB]}
    with pytest.raises(ValueError, match="not among"):
        parse_caps("sd3:4", ["sd15"])
    assert parse_caps("sdxl:4,sd15:2", ["sd15"], ignore_other_models=True) == {"sd15": [2 * GiB]}
    with pytest.raises(ValueError, match="use GiB"):
        parse_caps("four", ["sd15"])


def test_the_transformer_models_default_caps_are_a_t4_an_8_gib_card_and_4_gib_for_sd35_medium():
    from mlnb.bench.command import FULL_CAPS, QUICK_CAPS

    models = ["sd35-medium", "sd35-large", "flux-dev"]
    assert parse_caps(FULL_CAPS, models, ignore_other_models=True) == {
        "sd35-medium": [None, 4 * GiB, 8 * GiB, 15 * GiB], "sd35-large": [None, 8 * GiB, 15 * GiB],
        "flux-dev": [None, 8 * GiB, 15 * GiB],
    }
    # --quick: one cap each, the one its target names
    assert parse_caps(QUICK_CAPS, models, ignore_other_models=True) == {
        "sd35-medium": [4 * GiB], "sd35-large": [15 * GiB], "flux-dev": [15 * GiB],
    }
    # the UNet models keep theirs
    assert parse_caps(QUICK_CAPS, ["sd15", "sdxl"], ignore_other_models=True) == {
        "sd15": [2 * GiB], "sdxl": [4 * GiB, 15 * GiB],
    }


def test_the_plain_diffusers_recipes_include_fp8_layerwise_casting_with_model_offload():
    recipe = RECIPES["diffusers-layerwise-fp8"]
    assert (recipe.family, recipe.setting, recipe.needs_cuda) == ("diffusers", "layerwise_fp8", True)
    assert recipe in parse_recipes("diffusers")


def test_plan_puts_the_uncapped_baseline_first_once():
    recipes = parse_recipes("mlnb-auto,diffusers-none")
    runs = plan_runs([("sdxl", "/m", 1024, 1024)], recipes, {"sdxl": [4 * GiB, None]}, 8, "cuda")
    assert [(r.recipe, r.cap_bytes) for r in runs] == [
        (BASELINE, None), ("mlnb-auto", 4 * GiB), ("mlnb-auto", None), (BASELINE, 4 * GiB),
    ]
    quick = plan_runs([("sd15", "/a", 512, 512)], parse_recipes("mlnb-auto"), {"sd15": [2 * GiB]}, 8, "cuda")
    assert [(r.recipe, r.cap_bytes) for r in quick] == [(BASELINE, None), ("mlnb-auto", 2 * GiB)]
    assert quick[1].label() == "sd15 512x512 mlnb-auto cap 2 GiB"


# ---------------------------------------------------------------------------------------------------------------
# Pure: the floor, the ratios, the targets, the table


def test_streaming_floor_formula():
    """floor = max(compute, max(0, W - max(0, cap - A)) * steps / bandwidth)."""
    assert report.streamed_bytes(5 * GiB, None, GiB, 10) == 0
    assert report.streamed_bytes(5 * GiB, 4 * GiB, GiB, 10) == 20 * GiB
    assert report.streamed_bytes(5 * GiB, 16 * GiB, GiB, 10) == 0
    assert report.streamed_bytes(5 * GiB, GiB // 2, GiB, 10) == 50 * GiB  # activations eat the whole budget
    assert report.streaming_floor(1.0, 5 * GiB, 4 * GiB, GiB, 10, 20 * GiB) == 1.0
    assert report.streaming_floor(0.5, 5 * GiB, 4 * GiB, GiB, 10, 10 * GiB) == 2.0
    assert report.streaming_floor(0.5, 5 * GiB, None, GiB, 10, None) == 0.5  # uncapped: compute only
    assert report.streaming_floor(0.5, 5 * GiB, 4 * GiB, GiB, 10, None) is None  # must stream, rate unknown
    assert report.streaming_floor(None, 5 * GiB, 4 * GiB, GiB, 10, 1e9) is None


def test_add_derived_ratio_and_floor_against_the_same_model_size_and_steps():
    rows = report.add_derived(
        [_baseline(), _row(), _row(steps=20), _row(status="OOM", seconds=None, phase="generate")], bandwidth=10 * GiB
    )
    assert rows[0]["ratio"] == 1.0 and rows[0]["floor_seconds"] == 1.0
    assert rows[1]["ratio"] == 2.0
    activations = report.activation_reserve(1024, 1024)
    expected = max(1.0, (5 * GiB - (4 * GiB - activations)) * 8 / (10 * GiB))
    assert rows[1]["floor_seconds"] == pytest.approx(expected)
    assert rows[2]["ratio"] is None  # 20 steps: no baseline at 20 steps
    assert rows[3]["ratio"] is None and rows[3]["floor_seconds"] == pytest.approx(expected)


def _targets(rows, gpu=True):
    return {t["key"]: t for t in report.evaluate_targets(report.add_derived(rows, 10 * GiB), gpu=gpu)}


def test_targets_met_not_met_and_not_measured():
    rows = [
        _baseline(),
        _row(seconds=1.25),  # sdxl 4 GiB: 1.25x <= 1.3x, above the 1.15x stretch
        _row(cap_bytes=15 * GiB, level="none", seconds=1.04),  # 1.04x > 1.03x
        _row(model="sd15", recipe=BASELINE, cap_bytes=None, level=None, width=512, height=512, seconds=0.5),
    ]
    t = _targets(rows)
    assert t["sdxl-4gib"]["status"] == "met" and "1.25× (limit 1.3×; stretch 1.15×: not met)" in t["sdxl-4gib"]["detail"]
    assert t["sdxl-15gib"]["status"] == "not met"
    assert t["sd15-2gib"]["status"] == "not measured"
    assert t["host-ram"]["status"] == "met"  # 8 GiB RSS for 7 GiB weights: 1.14x
    assert all(v["status"] == "not measured" for v in _targets(rows, gpu=False).values())


def test_target_oom_is_not_met_and_says_oom():
    t = _targets([_baseline(), _row(status="OOM", seconds=None, phase="warm-up", error="OutOfMemoryError: CUDA out of memory")])
    assert t["sdxl-4gib"]["status"] == "not met"
    assert "OOM in warm-up" in t["sdxl-4gib"]["detail"]


def test_target_without_baseline_is_not_measured_and_auto_is_preferred():
    t = _targets([_row(recipe="mlnb-ultra", seconds=0.5), _row(seconds=9.0)])
    assert t["sdxl-4gib"]["status"] == "not measured" and "mlnb-auto (ultra)" in t["sdxl-4gib"]["detail"]


def test_host_ram_target_names_the_worst_run():
    t = _targets([_baseline(), _row(host_rss_peak=10 * GiB), _row(cap_bytes=15 * GiB, host_rss_peak=7 * GiB)])
    assert t["host-ram"]["status"] == "not met"
    assert "sdxl mlnb-auto cap 4 GiB" in t["host-ram"]["detail"] and "1.43×" in t["host-ram"]["detail"]


def test_planner_targets_check_budget_and_predictions():
    plan = dict(recipe="mlnb-plan", level="aggressive", peak_allocated=3 * GiB, peak_reserved=int(3.5 * GiB))
    rows = [
        _baseline(),
        _row(**plan, seconds=1.4, predicted_peak=int(3.2 * GiB), first_predicted_seconds=1.3, predicted_seconds=1.41),
        _row(**dict(plan, peak_allocated=8 * GiB, peak_reserved=9 * GiB), cap_bytes=15 * GiB, seconds=1.0,
             predicted_peak=int(8.4 * GiB), first_predicted_seconds=1.1, predicted_seconds=1.0),
    ]
    t = _targets(rows)
    assert t["plan-budget"]["status"] == "met" and "3.50 GiB" in t["plan-budget"]["detail"]
    assert t["plan-peak"]["status"] == "met" and "+7%" in t["plan-peak"]["detail"]  # 3.2 vs 3.0; 8.4 vs 8.0 is +5%
    assert t["plan-time"]["status"] == "met" and "1.30 s vs 1.40 s (-7%" in t["plan-time"]["detail"]
    assert "after the warm-up 1.41 s (+1%), not judged" in t["plan-time"]["detail"]  # shown, not judged
    # floor: 5 GiB UNet, 4 GiB cap, 8 steps at 10 GiB/s, compute 1.0 s; 1.4 s is 1.4x the floor when compute-bound
    assert t["sdxl-4gib-floor"]["status"] in ("met", "not met") and "floor" in t["sdxl-4gib-floor"]["detail"]

    over = _targets([_baseline(), _row(**dict(plan, peak_reserved=int(4.2 * GiB)), seconds=2.0,
                                       predicted_peak=2 * GiB, predicted_seconds=None)])
    assert over["plan-budget"]["status"] == "not met" and "reserved" in over["plan-budget"]["detail"]
    assert over["plan-peak"]["status"] == "not met" and "-33%" in over["plan-peak"]["detail"]
    assert over["plan-time"]["status"] == "not measured"
    oom = _targets([_baseline(), _row(recipe="mlnb-plan", status="OOM", phase="generate", seconds=None)])
    assert oom["plan-budget"]["status"] == "not met" and "OOM in generate" in oom["plan-budget"]["detail"]
    assert _targets([_baseline()])["plan-budget"]["status"] == "not measured"


_PLAN = "plan for 4.0 GiB: stream, 48 blocks streamed (1.8 GiB), 42 resident"  # what auto on CUDA writes


def test_a_planner_run_is_known_by_its_recipe_and_any_failure_under_a_cap_fails_the_budget():
    """auto on CUDA that ran out of memory while loading (no plan text, no level) or was stopped by --timeout is a
    planner run all the same: the budget cannot be claimed for it."""
    oom_at_load = _row(status="OOM", phase="load", error="OutOfMemoryError: CUDA out of memory", level=None,
                       detail=None, seconds=None, peak_allocated=None, peak_reserved=None)
    timed_out = {k: oom_at_load[k] for k in ("model", "recipe", "cap_bytes", "steps", "width", "height")}
    timed_out.update(status="error", error="timed out after 150 s", timed_out=True)
    sd15 = _row(model="sd15", cap_bytes=2 * GiB, width=512, height=512, peak_reserved=int(1.9 * GiB),
                detail="plan for 2.0 GiB: stream, 8 blocks streamed")
    for failed, words in ((oom_at_load, "OOM in load"), (timed_out, "timed out after 150 s")):
        t = _targets([_baseline(), sd15, failed])
        assert t["plan-budget"]["status"] == "not met", t["plan-budget"]
        assert words in t["plan-budget"]["detail"] and "None" not in t["plan-budget"]["detail"]
    error = _targets([_baseline(), _row(status="error", phase="warm-up", error="RuntimeError: boom", seconds=None)])
    assert error["plan-budget"]["status"] == "not met" and "error in warm-up" in error["plan-budget"]["detail"]
    cpu = _targets([_baseline(device="cpu"), _row(device="cpu", status="OOM", phase="load", detail=None)])
    assert cpu["plan-budget"]["status"] == "not measured"  # auto on a CPU is the level table, not the planner


def test_budget_target_says_what_it_measures_and_shows_nvml_above_the_baseline():
    """The cap limits what PyTorch reserves; the device-wide figure above the worker's baseline is shown beside it."""
    rows = report.add_derived([_baseline(), _row(nvml_peak=int(5.18 * GiB), nvml_baseline=int(0.98 * GiB))], None)
    assert rows[1]["nvml_above_baseline"] == int(5.18 * GiB) - int(0.98 * GiB)
    assert rows[0]["nvml_above_baseline"] is None  # no baseline reading: unknown, not invented
    t = {t["key"]: t for t in report.evaluate_targets(rows)}["plan-budget"]
    assert t["status"] == "met"  # peak reserved 3.5 GiB under 4 GiB, whatever NVML says
    assert "peak reserved 3.50 GiB, NVML 4.20 GiB above the worker's baseline" in t["detail"]
    assert "non-PyTorch memory are not counted" in t["target"]


def test_peak_target_fails_when_a_planned_run_ran_out_of_memory():
    rows = [
        _baseline(),
        _row(seconds=2.0, predicted_peak=int(3.63 * GiB), peak_allocated=int(3.7 * GiB), detail=_PLAN),
        _row(model="sd15", width=512, height=512, cap_bytes=2 * GiB, status="OOM", phase="generate", seconds=None,
             error="OutOfMemoryError: CUDA out of memory", predicted_peak=int(1.79 * GiB), peak_allocated=None,
             detail="plan for 2.0 GiB: stream, 8 blocks streamed"),
    ]
    t = _targets(rows)["plan-peak"]
    assert t["status"] == "not met" and "sd15 mlnb-auto cap 2 GiB: OOM in generate" in t["detail"]
    assert "(predicted 1.79 GiB)" in t["detail"] and "3.63 GiB vs 3.70 GiB (-2%)" in t["detail"]
    # Other failures are no measurement of the peak: nothing finished, nothing measured.
    error = _targets([_baseline(), _row(status="error", phase="warm-up", seconds=None, predicted_peak=3 * GiB)])
    assert error["plan-peak"]["status"] == "not measured"


def test_time_target_judges_the_prediction_made_before_the_first_image():
    """The calibrated prediction was fitted to the same run's warm-up image: it is shown, never judged."""
    rows = [_baseline(), _row(seconds=3.0, first_predicted_seconds=1.5, predicted_seconds=2.95, detail=_PLAN)]
    t = _targets(rows)["plan-time"]
    assert t["status"] == "not met", t
    assert "1.50 s vs 3.00 s (-50%; after the warm-up 2.95 s (-2%), not judged)" in t["detail"]
    assert "before a plan's first image" in t["target"]
    only_late = _targets([_baseline(), _row(seconds=3.0, predicted_seconds=2.95, detail=_PLAN)])["plan-time"]
    assert only_late["status"] == "not measured" and "before its first image" in only_late["detail"]


def _dit(model="flux-dev", **kw) -> dict:
    return _row(model=model, cap_bytes=15 * GiB, **kw)


def test_targets_of_models_that_did_not_run_are_left_out():
    keys = set(_targets([_baseline(), _row()]))
    assert {"sdxl-4gib", "sdxl-15gib", "host-ram", "plan-budget"} <= keys
    assert not keys & {"sd15-2gib", "flux-15gib", "sd35m-4gib", "dit-plan-time", "sdxl-loras-4gib", "sdxl-lora-switch"}
    keys = set(_targets([_baseline(model="flux-dev"), _dit()]))
    assert {"flux-15gib", "flux-15gib-plain", "flux-15gib-host", "dit-plan-budget", "dit-plan-peak"} <= keys
    assert not keys & {"sdxl-4gib", "sd35m-8gib"}


def test_flux_targets_ratio_with_stretch_faster_than_plain_and_host_bytes():
    rows = [
        _baseline(model="flux-dev"),
        _dit(seconds=1.4, host_rss_peak=11 * GiB),  # 1.4x: met, stretch 1.2x not met
        _dit(recipe="diffusers-layerwise-fp8", level=None, seconds=1.75),
        _dit(recipe="diffusers-group-stream", level=None, seconds=2.25),
        _dit(recipe="diffusers-model-offload", level=None, status="OOM", phase="warm-up", seconds=None),
    ]
    t = _targets(rows)
    assert t["flux-15gib"]["status"] == "met" and "1.40× (limit 1.5×; stretch 1.2×: not met)" in t["flux-15gib"]["detail"]
    plain = t["flux-15gib-plain"]
    assert plain["status"] == "met" and "diffusers-layerwise-fp8: 1.75 s/img (0.80×)" in plain["detail"]
    assert "diffusers-model-offload: OOM in warm-up" in plain["detail"]  # did not run under the cap
    assert t["flux-15gib-host"]["status"] == "met" and "11.0 GiB (limit 12.0 GiB)" in t["flux-15gib-host"]["detail"]
    slow = _targets([*rows[:1], _dit(seconds=2.0, host_rss_peak=13 * GiB), *rows[2:]])
    assert slow["flux-15gib-plain"]["status"] == "not met" and slow["flux-15gib-host"]["status"] == "not met"
    assert _targets(rows[:2])["flux-15gib-plain"]["status"] == "not measured"  # no plain recipe was tried
    only_oom = _targets(rows[:2] + rows[4:])["flux-15gib-plain"]
    assert only_oom["status"] == "met" and "no plain diffusers recipe finished" in only_oom["detail"]


def test_transformer_planner_targets_count_only_sd35_and_flux_runs():
    rows = [
        _baseline(), _row(seconds=2.0, first_predicted_seconds=1.0, predicted_peak=3 * GiB),  # sdxl: -50%
        _baseline(model="sd35-medium"),
        _row(model="sd35-medium", cap_bytes=8 * GiB, seconds=2.0, first_predicted_seconds=1.8,
             predicted_peak=3 * GiB),  # -10%: within 15%
    ]
    t = _targets(rows)
    assert t["plan-time"]["status"] == "not met" and t["dit-plan-time"]["status"] == "met"
    assert "sdxl" not in t["dit-plan-time"]["detail"] and t["dit-plan-peak"]["status"] == "met"
    assert t["sd35m-8gib"]["status"] == "not met" and "2.00×" in t["sd35m-8gib"]["detail"]
    assert t["sd35m-4gib"]["status"] == "not measured"


def _lora(**kw) -> dict:
    return _row(loras=5, lora_rank=32, adapter_bytes=int(443 * MiB), lora_mode="unfused", **kw)


def test_lora_targets_compare_with_the_model_alone_under_the_same_cap_and_time_the_switch():
    rows = [
        _baseline(), _row(seconds=3.0, step_seconds=0.110),
        _lora(seconds=3.2, step_seconds=0.118, lora_switch_seconds=0.6, lora_switch_times=[0.7, 0.6, 0.5]),
        _lora(cap_bytes=15 * GiB, level="none", seconds=1.7, lora_switch_seconds=0.4, lora_switch_times=[0.4]),
        _lora(recipe="diffusers-group-stream", level=None, seconds=7.0, lora_switch_seconds=3.0),  # plain: not judged
    ]
    t = _targets(rows)
    ratio, switch = t["sdxl-loras-4gib"], t["sdxl-lora-switch"]
    assert ratio["status"] == "met", ratio
    assert ratio["detail"].startswith("sdxl+5 LoRAs 4 GiB / sdxl 4 GiB = 1.07× (target ≤ 1.1×)")
    assert "of rank 32, 443.0 MiB of adapters (unfused)" in ratio["detail"] and "step 0.118 s vs 0.110 s" in ratio["detail"]
    assert switch["status"] == "met" and "0.60 s (median of 3, 0.50–0.70 s" in switch["detail"]
    assert "diffusers" not in switch["detail"]
    assert t["sdxl-4gib"]["detail"].startswith("mlnb-auto (ultra): 3.00 s/img")  # the run without LoRAs
    slow = _targets([*rows[:2], _lora(seconds=3.6, lora_switch_seconds=1.2, lora_switch_times=[1.2])])
    assert slow["sdxl-loras-4gib"]["status"] == "not met" and slow["sdxl-lora-switch"]["status"] == "not met"
    failed = _targets([*rows[:2], _lora(status="OOM", phase="load", seconds=None)])
    assert failed["sdxl-loras-4gib"]["status"] == "not met" and "OOM in load" in failed["sdxl-loras-4gib"]["detail"]
    assert failed["sdxl-lora-switch"]["status"] == "not measured"
    broken = _targets([*rows[:2], _lora(seconds=3.1, lora_switch_error="error: RuntimeError: boom")])
    assert broken["sdxl-lora-switch"]["status"] == "not met" and "boom" in broken["sdxl-lora-switch"]["detail"]
    alone = _targets([_baseline(), _lora(seconds=3.1)])["sdxl-loras-4gib"]
    assert alone["status"] == "not measured" and "sdxl alone under the same cap did not finish" in alone["detail"]


def test_lora_summary_sets_each_lora_run_beside_the_same_recipe_without():
    rows = report.add_derived([_baseline(), _row(seconds=3.0), _lora(seconds=3.3, lora_switch_seconds=0.6)], None)
    (item,) = report.lora_summary(rows)
    assert item["unfused_ratio"] == pytest.approx(1.1) and item["without_seconds"] == 3.0
    text = report.format_loras([item])
    assert "sdxl mlnb-auto cap 4 GiB, 5 LoRAs of rank 32 (443.0 MiB), unfused: 3.30 s/img, switch 0.60 s" in text
    assert "unfused 1.10×" in text
    table = report.format_table(rows)
    assert "LoRAs" in table.splitlines()[0] and "5×r32 443.0 MiB" in table and "0.60" in table.splitlines()[-1]
    assert "LoRAs" not in report.format_table(rows[:2])  # the columns come with LoRA rows only


def test_lora_runs_are_planned_after_the_runs_without_with_their_own_recipes_and_caps():
    from mlnb.bench.runner import LoraPlan

    recipes = parse_recipes("mlnb-auto")
    sets = {"sdxl": (("a.safetensors",), ("b.safetensors",))}
    from mlnb.bench.command import _lora_recipes

    lora_recipes, recipe_caps = _lora_recipes("mlnb-auto,diffusers-group-stream@4", recipes)
    assert recipe_caps == {"diffusers-group-stream": [4 * GiB]}
    plan = LoraPlan(lora_recipes, {"sdxl": [15 * GiB, 4 * GiB]}, sets, 32, 3, recipe_caps)
    runs = plan_runs([("sd15", "/m/sd15", 512, 512), ("sdxl", "/m/sdxl", 1024, 1024)], recipes,
                     {"sd15": [2 * GiB], "sdxl": [4 * GiB]}, 8, "cuda", loras=plan)
    got = [(r.model, r.recipe, r.cap_bytes and r.cap_bytes // GiB, len(r.loras)) for r in runs]
    assert got == [
        ("sd15", BASELINE, None, 0), ("sd15", "mlnb-auto", 2, 0),  # no LoRA files for sd15: no LoRA runs
        ("sdxl", BASELINE, None, 0), ("sdxl", "mlnb-auto", 4, 0),
        ("sdxl", BASELINE, None, 1), ("sdxl", "mlnb-auto", 15, 1), ("sdxl", "mlnb-auto", 4, 1),
        ("sdxl", "diffusers-group-stream", 4, 1),  # NAME@GiB: under that cap only
    ]
    job = runs[-1].job()
    assert job["loras"] == ("a.safetensors",) and job["switch_loras"] == ("b.safetensors",)
    assert (job["lora_rank"], job["lora_switches"]) == (32, 3) and "+1 LoRAs cap 4 GiB" in runs[-1].label()


def test_bench_loras_adapt_every_attention_projection_of_sdxl_with_its_real_shapes(tmp_path):
    """From the public SDXL UNet config on the meta device: 560 projections (attn1 and attn2 of 70 transformer
    blocks), 46.4 M parameters at rank 32, under the keys peft gives them."""
    from mlnb.bench.loras import adapter_shapes
    from mlnb.bench.models import load_arch

    folder = tmp_path / "sdxl"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps(load_arch("sdxl")["unet"]))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                          "unet": ["diffusers", "UNet2DConditionModel"]}))
    component, shapes = adapter_shapes(folder, 32)
    assert component == "unet" and len(shapes) == 2 * 560
    assert sum(s[0] * s[1] for s in shapes.values()) == 46_448_640  # 88.6 MiB in fp16
    cross = next(s for k, s in shapes.items() if k.endswith("attn2.to_k.lora_A.weight"))
    assert cross == (32, 2048)  # cross-attention reads the 2048 text features


@pytest.mark.parametrize("recipe", ["mlnb-auto", BASELINE])
def test_worker_runs_a_recipe_with_loras_and_times_set_switches(tiny_sdxl, clean_cache, cpu_current, tmp_path, recipe):
    from mlnb.bench.loras import write_loras
    from mlnb.bench.worker import run

    pytest.importorskip("peft", reason="diffusers loads LoRAs through peft, a dependency this environment lacks")
    info = write_loras(tiny_sdxl, tmp_path / "loras", count=2, rank=4)
    assert write_loras(tiny_sdxl, tmp_path / "loras", count=2, rank=4)["reused"] is True
    assert len(info["loras"]) == len(info["switch"]) == 2 and info["component"] == "unet"
    spec = RunSpec("sdxl", str(tiny_sdxl), recipe, None, 1, 64, 64, "cpu", loras=tuple(info["loras"]),
                   switch_loras=tuple(info["switch"]), lora_rank=4, lora_switches=3)
    row = run(spec.job())
    assert row["status"] == "ok", row
    assert (row["loras"], row["lora_rank"], row["lora_mode"]) == (2, 4, "unfused")
    assert row["adapter_bytes"] > 0 and row["lora_file_bytes"] == 2 * info["file_bytes"]
    assert len(row["lora_switch_times"]) == 3 and row["lora_switch_seconds"] > 0
    assert ("load_lora_weights" in row["detail"]) == (recipe == BASELINE)


def test_bench_with_loras_builds_them_and_writes_the_lora_runs(tiny_sdxl, tmp_path, monkeypatch, capsys):
    """The command line: the LoRAs are written for the model it runs (in-process on a CPU), the LoRA runs planned
    after the others, and the JSON says what was asked. The runs themselves are stood in for here (the worker test
    above runs them)."""
    from mlnb.bench import command

    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(tiny_sdxl, cache / "tiny-sdxl")
    monkeypatch.setenv("MLNB_CACHE", str(cache))
    jobs = []

    def fake_run_job(job, log, timeout=None):
        jobs.append(job)
        return {"status": "ok", "seconds": 1.0 + 0.1 * len(job["loras"]), "loras": len(job["loras"]),
                "lora_switch_seconds": 0.5 if job["loras"] else None}

    monkeypatch.setattr(command, "run_job", fake_run_job)
    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--models", "sdxl", "--recipes", "mlnb-auto", "--loras", "2", "--lora-rank", "4",
                 "--lora-recipes", "mlnb-auto", "--work-dir", str(tmp_path / "work"), "--json", str(out)]) == 0
    assert [(j["recipe"], len(j["loras"]), len(j["switch_loras"])) for j in jobs] == [
        (BASELINE, 0, 0), ("mlnb-auto", 0, 0), (BASELINE, 2, 2), ("mlnb-auto", 2, 2)]
    assert all(os.path.isfile(f) for f in jobs[-1]["loras"] + jobs[-1]["switch_loras"])
    doc = json.loads(out.read_text())
    assert doc["settings"]["loras"]["count"] == 2 and doc["settings"]["loras"]["mode"] == "unfused"
    assert [b["job"] for b in doc["builds"]] == ["loras"] and doc["builds"][0]["layers"] > 0
    assert [(r["recipe"], r["loras"], r["lora_rank"]) for r in doc["runs"]][2:] == [(BASELINE, 2, 4), ("mlnb-auto", 2, 4)]
    assert [i["unfused_ratio"] for i in doc["loras"]] == [pytest.approx(1.2)] * 2
    printed = capsys.readouterr().out
    assert "writing 2 + 2 random rank-4 LoRAs for sdxl" in printed and "LoRA switch 0.50 s" in printed


def test_floor_target_is_not_met_when_its_run_fails():
    t = _targets([_baseline(), _row(status="OOM", phase="load", seconds=None, error="OutOfMemoryError: x")])
    assert t["sdxl-4gib-floor"]["status"] == "not met" and "OOM in load" in t["sdxl-4gib-floor"]["detail"]
    assert _targets([_baseline()])["sdxl-4gib-floor"]["status"] == "not measured"


def test_host_target_counts_mlnb_runs_that_failed():
    """A run that failed had still held its host RSS peak; one that failed before its parameters were counted is
    measured against the model's fp16 bytes from another run."""
    failed = _row(status="error", phase="warm-up", seconds=None, host_rss_peak=int(10.35 * GiB))
    t = _targets([_baseline(), _row(cap_bytes=15 * GiB, host_rss_peak=7 * GiB), failed])["host-ram"]
    assert t["status"] == "not met" and "1.48×" in t["detail"] and "(error in warm-up" in t["detail"]
    at_load = _row(status="OOM", phase="load", seconds=None, host_rss_peak=10 * GiB, fp16_weight_bytes=None)
    t = _targets([_baseline(), _row(cap_bytes=15 * GiB, host_rss_peak=7 * GiB), at_load])["host-ram"]
    assert t["status"] == "not met" and "1.43× of 7.0 GiB" in t["detail"]


def test_caps_that_are_not_whole_gib_are_shown_as_given():
    rows = report.add_derived([_baseline(), _row(cap_bytes=int(3.5 * GiB), recipe="mlnb-plan")], 10 * GiB)
    cells = report.format_table(rows).splitlines()[3].split()
    assert cells[3] == "3.5", cells
    budget = {t["key"]: t for t in report.evaluate_targets(rows)}["plan-budget"]["detail"]
    assert "sdxl mlnb-plan cap 3.5 GiB" in budget, budget
    assert report.cap_text(int(0.3 * GiB)) == "0.3" and report.cap_text(15 * GiB) == "15"


def test_a_run_that_timed_out_reads_timed_out(tmp_path):
    slow = [sys.executable, "-c", "import time; time.sleep(30)"]
    row = run_job({"job": "run"}, tmp_path / "w.log", timeout=0.5, launcher=slow)
    assert row["status"] == "error" and row["timed_out"] is True and row["error"] == "timed out after 0.5 s"
    spec = dict(model="sdxl", recipe="mlnb-auto", cap_bytes=4 * GiB, steps=8, width=1024, height=1024)
    rows = report.add_derived([_baseline(), {**spec, **row}], 10 * GiB)
    assert report.format_table(rows).splitlines()[3].endswith("timed out")
    t = {t["key"]: t for t in report.evaluate_targets(rows)}["sdxl-4gib"]
    assert t["status"] == "not met" and t["detail"] == "mlnb-auto: timed out after 0.5 s"


def test_floor_target_is_judged_against_the_streaming_floor():
    # 5 GiB UNet, 4 GiB cap: (5 - (4 - A)) GiB x 8 steps / 10 GiB/s; compute 1.0 s.
    floor = report.streaming_floor(1.0, 5 * GiB, 4 * GiB, report.activation_reserve(1024, 1024), 8, 10 * GiB)
    fast = _targets([_baseline(), _row(recipe="mlnb-plan", seconds=floor * 1.1)])
    slow = _targets([_baseline(), _row(recipe="mlnb-plan", seconds=floor * 1.3)])
    assert fast["sdxl-4gib-floor"]["status"] == "met" and slow["sdxl-4gib-floor"]["status"] == "not met"
    assert "1.30×" in slow["sdxl-4gib-floor"]["detail"]


def test_table_has_every_column_and_marks_missing_values():
    rows = report.add_derived(
        [_baseline(), _row(), _row(recipe="diffusers-sequential", status="OOM", phase="load", seconds=None, level=None)], 10 * GiB
    )
    text = report.format_table(rows)
    header = text.splitlines()[0]
    for title in ("model", "size", "recipe", "cap GiB", "s/img", "×none", "floor s", "step s", "replay s",
                  "peak alloc GiB", "peak rsrv GiB", "NVML peak GiB", "host RSS GiB", "status"):
        assert title in header
    lines = text.splitlines()[2:]
    assert len(lines) == 3
    assert "mlnb-auto→ultra" in lines[1] and "2.00" in lines[1] and lines[1].rstrip().endswith("ok")
    assert "OOM (load)" in lines[2] and "—" in lines[2]
    doc = {"machine": {"card": "H100"}, "versions": {"torch": "2.11"}, "date": "d", "command": "mlnb bench --quick",
           "runs": rows, "targets": report.evaluate_targets(rows)}
    markdown = report.format_markdown(doc)
    assert "`mlnb bench --quick`" in markdown and "| model |" in markdown and "torch 2.11" in markdown


# ---------------------------------------------------------------------------------------------------------------
# The device layer under a cap


class _CappedCuda:
    def mem_get_info(self, index):
        return 70 * GiB, 80 * GiB

    def memory_reserved(self, index):
        return 1 * GiB

    def set_per_process_memory_fraction(self, fraction, index):
        self.fraction = fraction


def test_cuda_free_bytes_honour_the_memory_cap(monkeypatch):
    """Under a cap the process sees the smaller card, so the auto level is chosen for it."""
    cuda = _CappedCuda()
    monkeypatch.setattr(CudaDevice, "_cuda", staticmethod(lambda: cuda))
    dev = CudaDevice(0)
    assert dev.free_bytes() == 70 * GiB
    dev.set_memory_cap(4 * GiB)
    assert cuda.fraction == pytest.approx(4 / 80)
    assert dev.free_bytes() == 3 * GiB  # cap minus what this process reserved
    assert dev._capped(70 * GiB, 80 * GiB) == (3 * GiB, 4 * GiB)
    dev.set_memory_cap(None)
    assert dev.free_bytes() == 70 * GiB and cuda.fraction == 1.0


def test_device_used_bytes():
    assert FakeDevice(other_processes=GiB).device_used_bytes() == GiB
    assert FakeDevice(nvml_fails=True).device_used_bytes() is None


# ---------------------------------------------------------------------------------------------------------------
# One recipe in-process (the worker's run function) on the tiny model


@pytest.fixture
def cpu_current():
    """The worker makes the CPU the current device; restore the previous one after the test."""
    from mlnb.device import CpuDevice, use_device

    with use_device(CpuDevice()):
        yield


def _job(path, recipe, **kw) -> dict:
    spec = RunSpec("sd15", str(path), recipe, None, 1, 64, 64, "cpu")
    return dict(spec.job(), **kw)


def test_worker_run_measures_one_recipe(tiny_sd, clean_cache, cpu_current):
    from mlnb.bench.worker import run

    row = run(_job(tiny_sd, "mlnb-auto"))
    assert row["status"] == "ok", row
    assert row["level"] == "none" and "no CUDA device" in row["detail"]
    assert row["seconds"] > 0 and row["warmup_seconds"] > 0 and row["load_seconds"] > 0
    assert row["host_rss_peak"] >= row["host_rss_baseline"] > 0
    assert row["peak_allocated"] is None and row["nvml_peak"] is None  # no GPU: N/A, never invented
    assert row["fp16_weight_bytes"] == 2 * sum(row["params"].values()) and row["denoiser_fp16_bytes"] > 0
    assert (row["width"], row["height"]) == (64, 64)
    assert "allocator" not in row  # no caching allocator to count on a CPU
    assert row["cleanup_steps"] == []  # on a CPU no cache to clear, and no collection unless an error
    assert row["vae_decode"] == "fp32"  # the CPU computes in fp32
    assert "cleanup_freed" in row  # host RSS given back on a CPU (None where it cannot be read)
    assert set(row["phase_seconds"]) == {"before", "pipeline", "cleanup", "after"}
    # generate's phases, inside the timed image (each is rounded to 0.1 ms in the row)
    assert sum(row["phase_seconds"].values()) <= row["seconds"] + 4 * 0.00005
    assert 0 < row["first_step_seconds"] <= row["phase_seconds"]["pipeline"]


def test_worker_records_what_the_allocator_did_during_the_measured_image(tiny_sd, clean_cache, cpu_current,
                                                                        monkeypatch):
    from mlnb.bench.worker import run
    from mlnb.device import CpuDevice

    calls = iter(range(10))

    def counters(self):  # cumulative, as torch's are: 3 retries and 2 device mallocs happen each time it is read
        n = next(calls)
        return {"num_alloc_retries": 3 * n, "num_device_alloc": 2 * n}

    monkeypatch.setattr(CpuDevice, "allocator_counters", counters)
    row = run(_job(tiny_sd, "mlnb-auto"))
    assert row["status"] == "ok" and row["allocator"] == {"num_alloc_retries": 3, "num_device_alloc": 2}
    assert "allocator_loop" not in row  # counted in the steps on CUDA only (tests/test_streaming.py)


def test_worker_reports_oom_as_oom(tiny_sd, clean_cache, cpu_current, monkeypatch):
    """A generation that runs out of memory gives an OOM row with the phase, not an error and not a crash."""
    from mlnb.bench.worker import run
    from mlnb.pipeline import ManagedPipeline

    def out_of_memory(self, *args, **kwargs):
        raise FakeOutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ManagedPipeline, "generate", out_of_memory)
    row = run(_job(tiny_sd, "mlnb-ultra"))
    assert (row["status"], row["phase"]) == ("OOM", "warm-up")
    assert "out of memory" in row["error"] and row.get("seconds") is None


@pytest.mark.parametrize("recipe", ["diffusers-group-stream", "diffusers-layerwise-fp8"])
def test_worker_skips_offload_recipes_without_cuda(tiny_sd, cpu_current, recipe):
    from mlnb.bench.worker import run

    row = run(_job(tiny_sd, recipe))
    assert row["status"] == "skipped" and "needs a CUDA device" in row["error"]


def test_classify_follows_the_exception_chain():
    from mlnb.bench.worker import classify

    dev = FakeDevice()
    try:
        try:
            raise FakeOutOfMemoryError("CUDA out of memory")
        except FakeOutOfMemoryError as inner:
            raise RuntimeError("loading failed") from inner
    except RuntimeError as outer:
        assert classify(outer, dev) == "OOM"
    assert classify(ValueError("x"), dev) == "error"


# ---------------------------------------------------------------------------------------------------------------
# Subprocesses: the OOM path through a real worker, and the CPU harness end to end


def test_crashing_worker_becomes_an_error_row(tmp_path):
    row = run_job({"job": "run"}, tmp_path / "w.log", timeout=60, launcher=[sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    assert row["status"] == "error" and "status 3" in row["error"] and "boom" in row["log_tail"]


# Loaded by every worker process of the end-to-end test (PYTHONPATH): mlnb recipes load for real, then their
# generation raises the fake out-of-memory error, as a capped GPU would.
_OOM_SITECUSTOMIZE = """
from mlnb.bench import recipes
from mlnb.testing import FakeOutOfMemoryError

_prepare_mlnb = recipes._prepare_mlnb


def _out_of_memory():
    raise FakeOutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _prepare_then_oom(*args, **kwargs):
    prepared = _prepare_mlnb(*args, **kwargs)
    prepared.generate = _out_of_memory
    return prepared


recipes._prepare_mlnb = _prepare_then_oom
"""


def test_cpu_bench_end_to_end_writes_valid_json(tiny_sd, tmp_path, monkeypatch, capsys):
    """``mlnb bench --device cpu`` on the tiny SD model, each recipe in its own worker process: the baseline runs,
    the mlnb recipe goes out of memory in its worker and comes back as an OOM row; the JSON has every field."""
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(tiny_sd, cache / "tiny-sd")  # the tiny model the CPU mode stands in for sd15
    monkeypatch.setenv("MLNB_CACHE", str(cache))
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_OOM_SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "out" / "bench.json"
    md = tmp_path / "bench.md"
    argv = ["--device", "cpu", "--models", "sd15", "--recipes", "mlnb-auto", "--steps", "1", "--caps", "2",
            "--json", str(out), "--markdown", str(md), "--log-dir", str(tmp_path / "logs")]
    assert main(argv) == 0  # an OOM is a result, not a failure
    printed = capsys.readouterr().out
    assert "memory caps need a CUDA device" in printed and "[not measured]" in printed
    assert "OOM (warm-up)" in printed
    doc = json.loads(out.read_text())
    assert doc["complete"] is True
    for key in ("schema", "date", "command", "argv", "machine", "versions", "settings", "floor_formula", "builds",
                "runs", "targets"):
        assert key in doc, key
    assert doc["command"] == "mlnb bench " + " ".join(argv)
    assert doc["machine"]["card"] == "CPU (no CUDA device)" and doc["machine"]["device"] == "cpu"
    for name in ("torch", "diffusers", "transformers", "accelerate", "python", "cuda", "driver"):
        assert name in doc["versions"], name
    base, auto = doc["runs"]
    assert (base["recipe"], base["cap_bytes"], base["status"]) == (BASELINE, None, "ok")
    missing = [f for f in RUN_FIELDS if f not in base]
    assert not missing, missing
    assert base["ratio"] == 1.0 and base["seconds"] > 0 and base["host_rss_peak"] > 0
    assert (auto["recipe"], auto["status"], auto["phase"], auto["level"]) == ("mlnb-auto", "OOM", "warm-up", "none")
    assert "out of memory" in auto["error"] and auto["ratio"] is None
    assert [t["key"] for t in doc["targets"]] == [t.key for t in report.TARGETS if report.applies(t, doc["runs"])]
    assert {t["status"] for t in doc["targets"]} == {"not measured"} and "sd15-2gib" in {t["key"] for t in doc["targets"]}
    assert len(list((tmp_path / "logs").glob("run-*.log"))) == 2 and "| model |" in md.read_text()


def _jobs_in_process(job, log_path, timeout=None):
    """:func:`mlnb.bench.runner.run_job` without the worker process: the same job file through the worker's ``main``
    in this process (the end-to-end test above covers the process boundary; a process per job costs each one the
    imports of torch and diffusers)."""
    from mlnb.bench import worker

    with tempfile.TemporaryDirectory(prefix="mlnb-bench-job-") as tmp:
        job = dict(job, result=str(Path(tmp) / "result.json"))
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        assert worker.main([str(job_file)]) == 0
        result = json.loads(Path(job["result"]).read_text())
    result["wall_seconds"] = 0.0
    return result


def test_cpu_bench_quick_runs_the_transformer_archs_on_their_tiny_stand_ins(tiny_sd3, tiny_flux, tmp_path,
                                                                             monkeypatch, capsys, cpu_current):
    """``mlnb bench --device cpu --models sd35-medium,flux-dev --quick``: the tiny SD3 and Flux pipelines stand in,
    each recipe through the worker's entry point; the offload recipe that needs CUDA is skipped, the others generate
    64×64."""
    from mlnb.bench import command

    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(tiny_sd3, cache / "tiny-sd3")
    os.symlink(tiny_flux, cache / "tiny-flux")
    monkeypatch.setenv("MLNB_CACHE", str(cache))
    monkeypatch.setattr(command, "run_job", _jobs_in_process)
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--models", "sd35-medium,flux-dev", "--quick", "--json", str(out),
            "--log-dir", str(tmp_path / "logs")]
    assert main(argv) == 0
    assert "sd35-medium" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and [m["size"] for m in doc["settings"]["models"]] == [64, 64]
    runs = {(r["model"], r["recipe"]): r for r in doc["runs"]}
    assert set(runs) == {(m, r) for m in ("sd35-medium", "flux-dev")
                         for r in (BASELINE, "mlnb-auto", "diffusers-group-stream")}
    for model, t5 in (("sd35-medium", "text_encoder_3"), ("flux-dev", "text_encoder_2")):
        base, auto = runs[model, BASELINE], runs[model, "mlnb-auto"]
        assert runs[model, "diffusers-group-stream"]["status"] == "skipped"
        for row in (base, auto):
            assert row["status"] == "ok" and (row["width"], row["height"]) == (64, 64) and row["seconds"] > 0, row
            assert "unet" not in row["params"] and t5 in row["params"]
            assert row["denoiser_fp16_bytes"] == 2 * row["params"]["transformer"]
        assert auto["level"] == "none" and base["ratio"] == 1.0


def test_bad_options_exit_with_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--recipes", "turbo", "--device", "cpu"])
    assert exc.value.code == 2 and "unknown recipe" in capsys.readouterr().err


_CPU_ONE_RUN = ["--device", "cpu", "--models", "sd15", "--recipes", "diffusers-none", "--steps", "1"]


@pytest.mark.parametrize("bad, option", [
    (["--cap-gib", "0"], "--cap-gib"),  # once read as "no --cap-gib": the whole default benchmark ran
    (["--cap-gib", "nan"], "--cap-gib"),
    (["--caps", "inf"], "--caps"),  # once an OverflowError traceback
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "-5"], "--timeout"),
])
def test_bad_numbers_are_one_line_usage_errors(bad, option, tmp_path, capsys):
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exc:
        main([*bad, *_CPU_ONE_RUN, "--json", str(out)])
    printed = capsys.readouterr()
    assert exc.value.code == 2 and printed.err.splitlines()[-1].startswith(f"mlnb bench: error: {option}")
    assert "Traceback" not in printed.err and printed.out == "" and not out.exists()


def test_device_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    """The probe worker reports the CPU instead of raising; the parent says so in one line."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cuda", "--log-dir", str(tmp_path / "logs"), "--json", str(tmp_path / "bench.json")])
    printed = capsys.readouterr()
    assert exc.value.code == 2 and "--device cuda: torch sees no CUDA device" in printed.err.splitlines()[-1]
    assert "Traceback" not in printed.out + printed.err + (tmp_path / "logs" / "probe.log").read_text()


def test_help_says_that_a_zero_cap_is_no_cap(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "a value of 0, none or off means uncapped" in " ".join(capsys.readouterr().out.split())


def test_a_missing_model_folder_is_a_usage_error_before_any_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path / "nowhere"), "--device", "cpu", "--recipes", "diffusers-none", "--json", str(out)])
    printed = capsys.readouterr()
    assert exc.value.code == 2 and "--model: no model folder at" in printed.err.splitlines()[-1]
    assert printed.out == "" and not out.exists()


def test_a_model_of_unknown_size_is_labelled_native_size():
    """A hub id (or a folder without a UNet config) under --model and no --size generates at its native size."""
    spec = RunSpec("org/model", "org/model", "mlnb-auto", None, 8, None, None, "cuda")
    assert spec.label() == "org/model native size mlnb-auto no cap"
    row = dict(model="org/model", recipe="mlnb-auto", cap_bytes=None, steps=8, width=None, height=None,
               status="error", phase="load", error="OfflineError: no network")
    assert report.format_table(report.add_derived([row], None)).splitlines()[2].split()[1] == "native"


def test_the_worker_process_imports_its_module_once(tmp_path):
    """``python -m mlnb.bench.worker`` once warned (runpy) that the package had imported the worker already."""
    row = run_job({"job": "probe", "device": "cpu"}, tmp_path / "probe.log", timeout=120)
    assert row.get("device") == "cpu", row
    assert "RuntimeWarning" not in (tmp_path / "probe.log").read_text()


def test_folder_native_size(tiny_sd, tmp_path):
    assert folder_native_size(tiny_sd) == 64
    assert folder_native_size(tmp_path) is None


def test_folder_native_size_of_transformer_pipelines(tiny_sd3, tiny_flux, monkeypatch, tmp_path):
    """SD3's transformer has a ``sample_size``; Flux's has none (the pipeline's own default applies), so its tiny
    stand-in runs at the size the tiny models are made for."""
    from mlnb.bench.models import tiny_source

    assert folder_native_size(tiny_sd3) == 64
    assert folder_native_size(tiny_flux) is None
    monkeypatch.setenv("MLNB_CACHE", str(tmp_path))
    os.symlink(tiny_flux, tmp_path / "tiny-flux")
    assert tiny_source("flux-dev").size == 64 and tiny_source("flux-dev").path == str(tmp_path / "tiny-flux")


# ---------------------------------------------------------------------------------------------------------------
# On a CUDA machine (scripts/gpu_check.sh): the probe and the cap, with real CUDA


@pytest.mark.gpu
def test_gpu_probe_reads_the_card_and_its_bandwidth(tmp_path):
    machine = run_job({"job": "probe", "device": "cuda"}, tmp_path / "probe.log", timeout=120)
    assert machine["device"] == "cuda", machine
    assert machine["total_bytes"] > 0 and machine["h2d_bandwidth"] > 1e9  # bytes/s: any PCIe link beats 1 GB/s
    assert machine["versions"]["torch"]


@pytest.mark.gpu
def test_gpu_memory_cap_shrinks_the_card_and_oom_is_reported(tmp_path):
    """Under a 1 GiB cap, a 2 GiB allocation fails with an error the device calls OOM; free memory shows the cap."""
    from mlnb.device import get_device

    dev = get_device()
    try:
        dev.set_memory_cap(1 * GiB)
        assert dev.free_bytes() <= 1 * GiB and dev.info().total_bytes == 1 * GiB
        import torch

        with pytest.raises(Exception) as exc:
            torch.empty(2 * GiB, dtype=torch.uint8, device=dev.torch_device)
        assert dev.is_oom(exc.value)
    finally:
        dev.set_memory_cap(None)
        dev.empty_cache()


def test_timeline_tells_hidden_copies_from_serial_ones_and_idle_time(tmp_path):
    """Kernel and copy intervals as torch.profiler writes them (microseconds)."""
    import gzip
    import json

    from mlnb.bench.timeline import read_trace, summarize

    def kernel(ts, dur):
        return {"ph": "X", "cat": "kernel", "name": "gemm", "ts": ts, "dur": dur, "tid": 7}

    def copy(ts, dur, kind="Pinned -> Device"):
        return {"ph": "X", "cat": "gpu_memcpy", "name": f"Memcpy HtoD ({kind})", "ts": ts, "dur": dur, "tid": 20,
                "args": {"bytes": dur * 50_000}}  # 50 GB/s

    # Copies of 100 us each: the first under a kernel, the second after it with nothing else running, then 50 us of
    # nothing, then a kernel; a pageable copy (the VAE's move) is not a streamed one.
    events = [copy(0, 100), kernel(0, 150), copy(150, 100), kernel(300, 100), copy(300, 100), copy(1000, 500, "Pageable -> Device")]
    summary = summarize(events)
    assert summary["copies"] == 3 and summary["window_seconds"] == pytest.approx(400e-6)
    assert summary["copy_seconds"] == pytest.approx(300e-6) and summary["hidden"] == pytest.approx(2 / 3)
    assert summary["copy_bandwidth"] == pytest.approx(50e9)
    assert summary["kernel_seconds"] == pytest.approx(250e-6) and summary["idle_seconds"] == pytest.approx(50e-6)
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    assert summarize(read_trace(path)) == summary
    assert summarize([kernel(0, 10), copy(0, 5, "Pageable -> Device")]) == {
        "copies": 0, "memcpy_names": ["Memcpy HtoD (Pageable -> Device)"]}
