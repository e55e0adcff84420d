"""The benchmark's recipes: plain diffusers set-ups, and every mlnb level through :func:`mlnb.load_pipeline`.

Plain diffusers, as a user would write it:

- ``diffusers-none``: ``pipe.to("cuda")``. This is the baseline every ratio is taken against (uncapped).
- ``diffusers-model-offload``: ``pipe.enable_model_cpu_offload()``.
- ``diffusers-sequential``: ``pipe.enable_sequential_cpu_offload()``.
- ``diffusers-group-stream``: ``pipe.enable_group_offload(offload_type="leaf_level", use_stream=True)``, with the
  VAE kept in fp16 (``force_upcast`` disabled: the fp32 upcast crashes group offloading) and tiled at 512 px
  (``vae.enable_tiling()`` alone tiles at SDXL's 1024 px, which does nothing for a 1024² image), so that it runs.
- ``diffusers-layerwise-fp8``: the denoiser's ``enable_layerwise_casting(storage_dtype=float8_e4m3fn)`` (weights
  stored as fp8, each layer upcast for its forward) with ``pipe.enable_model_cpu_offload()``: diffusers' recipe for
  a transformer (FLUX.1's 24 GB, SD3.5 large's 16 GB) whose 16-bit weights do not fit the card beside nothing else.

mlnb: ``mlnb-none``, ``mlnb-balanced``, ``mlnb-aggressive``, ``mlnb-ultra`` and ``mlnb-auto`` load the same folder
with ``mlnb.load_pipeline(folder, level=...)`` and generate with ``ManagedPipeline.generate``, exactly as a notebook
does; ``mlnb-plan`` loads it with ``budget=`` the free memory under the cap. On a CUDA card ``auto`` is the budget
planner for the free memory too, so the two differ only in how they are asked for; the plan's predicted peak and
time go into the row. Every recipe loads the same saved folder, so loading is the same for all of them.

With LoRAs (``mlnb bench --loras N``), each recipe loads the same ``.safetensors`` files the way its users do.
mlnb's recipes pass them as ``load_pipeline(folder, ..., loras=[...])`` and switch sets with
``ManagedPipeline.set_loras``: unfused adapters, the only mode mlnb has. The plain diffusers recipes load each file
with ``pipe.load_lora_weights(file, adapter_name=...)`` and weight them with ``pipe.set_adapters(names, weights)``
before the recipe's own set-up (``pipe.to``, the offloads, layerwise casting), as diffusers' LoRA guide does, and
switch sets with ``pipe.delete_adapters`` then the same two calls for the new files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger(__name__)

__all__ = ["Recipe", "RECIPES", "BASELINE", "RecipeSkipped", "Prepared", "LoraSets", "parse_recipes", "prepare"]

BASELINE = "diffusers-none"


@dataclass(frozen=True)
class Recipe:
    """One way of running a pipeline.

    Args:
        name: the recipe's name on the command line and in the table.
        family: ``"diffusers"`` (plain diffusers calls) or ``"mlnb"`` (``mlnb.load_pipeline`` at a level).
        setting: the diffusers set-up (``none``, ``model_offload``, ``sequential``, ``group_stream``,
            ``layerwise_fp8``) or the level.
        description: one line for the docs and ``--help``.
        needs_cuda: the recipe installs offload hooks, which need a CUDA device to onload to.
    """

    name: str
    family: str
    setting: str
    description: str
    needs_cuda: bool = False


_ALL = (
    Recipe(BASELINE, "diffusers", "none", "plain diffusers, whole pipeline on the GPU (the baseline)"),
    Recipe("diffusers-model-offload", "diffusers", "model_offload", "plain enable_model_cpu_offload()", True),
    Recipe("diffusers-sequential", "diffusers", "sequential", "plain enable_sequential_cpu_offload()", True),
    Recipe(
        "diffusers-group-stream", "diffusers", "group_stream",
        "plain enable_group_offload(leaf_level, use_stream=True); VAE fp16 (force_upcast off), tiles 512", True,
    ),
    Recipe(
        "diffusers-layerwise-fp8", "diffusers", "layerwise_fp8",
        "plain enable_layerwise_casting(fp8 storage) on the denoiser + enable_model_cpu_offload()", True,
    ),
    Recipe("mlnb-none", "mlnb", "none", "mlnb.load_pipeline(level='none')"),
    Recipe("mlnb-balanced", "mlnb", "balanced", "mlnb.load_pipeline(level='balanced')"),
    Recipe("mlnb-aggressive", "mlnb", "aggressive", "mlnb.load_pipeline(level='aggressive')"),
    Recipe("mlnb-ultra", "mlnb", "ultra", "mlnb.load_pipeline(level='ultra')"),
    Recipe("mlnb-auto", "mlnb", "auto", "mlnb.load_pipeline(level='auto'): on CUDA a plan for the free VRAM"),
    Recipe("mlnb-plan", "mlnb", "plan", "mlnb.load_pipeline(budget=free VRAM under the cap): the budget planner"),
)
RECIPES: dict[str, Recipe] = {r.name: r for r in _ALL}


class RecipeSkipped(Exception):
    """The recipe cannot run here (for example an offload without a CUDA device); the message says why."""


def parse_recipes(text: str | None) -> list[Recipe]:
    """``"all"``, ``"diffusers"``, ``"mlnb"`` or a comma list of names (``"ultra"`` means ``"mlnb-ultra"``).

    Raises:
        ValueError: naming the unknown recipe and the known ones.
    """
    if text is None or text.strip() in ("", "all"):
        return list(_ALL)
    chosen: list[Recipe] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item in ("diffusers", "mlnb"):
            found = [r for r in _ALL if r.family == item]
        elif item in RECIPES:
            found = [RECIPES[item]]
        elif f"mlnb-{item}" in RECIPES:
            found = [RECIPES[f"mlnb-{item}"]]
        else:
            raise ValueError(f"unknown recipe {item!r}: use all, diffusers, mlnb or some of {', '.join(RECIPES)}")
        chosen += [r for r in found if r not in chosen]
    if not chosen:
        raise ValueError("--recipes is empty: name at least one recipe")
    return chosen


@dataclass
class Prepared:
    """A loaded recipe, ready to generate.

    Args:
        generate: makes one image with the benchmark's prompt, steps, size and seed.
        pipe: the underlying diffusers pipeline (to count parameters).
        level: the mlnb level that runs (``auto`` resolved), ``None`` for plain diffusers.
        detail: what was set up (the applied techniques, or the diffusers calls).
        stats: filled by each ``generate``: ``step_seconds`` and ``decode_seconds`` (the step callback's timing),
            and for the budget planner ``predicted_peak`` and ``predicted_seconds``.
        after: adds to ``stats`` what is worked out from the timed image but is no part of making it (the planner's
            replay of the step); the worker calls it once the image is timed.
        switch: with LoRAs, changes the loaded pipeline from its LoRA set to the other one (each call switches);
            the worker times it.
    """

    generate: Callable[[], Any]
    pipe: Any
    level: str | None
    detail: str
    stats: dict = field(default_factory=dict)
    after: Callable[[], None] | None = None
    switch: Callable[[], None] | None = None


@dataclass(frozen=True)
class LoraSets:
    """The LoRAs of a run: the files it loads, and the set it switches to (and back from) to time a switch."""

    files: tuple[str, ...]
    other: tuple[str, ...] = ()


def _diffusers_names(files, prefix: str) -> list[str]:
    # diffusers looks for an adapter's keys by its name in every key: a name no module path contains
    return [f"bench_{prefix}{i}" for i in range(len(files))]


def _load_diffusers_loras(pipe, loras: LoraSets) -> tuple[dict, Callable[[], None]]:
    """Load the LoRAs the documented way; the stats and a switch to the other set and back."""
    from ..pipeline.adapters import adapter_bytes

    def load(files, prefix):
        names = _diffusers_names(files, prefix)
        for name, file in zip(names, files):
            pipe.load_lora_weights(file, adapter_name=name)
        pipe.set_adapters(names, [1.0] * len(names))
        return names

    start = time.perf_counter()
    current = {"names": load(loras.files, "a"), "prefix": "a"}
    stats = {"lora_load_seconds": time.perf_counter() - start, "lora_mode": "unfused",
             "adapter_bytes": sum(adapter_bytes(pipe, n) for n in current["names"])}

    def switch():
        prefix = "b" if current["prefix"] == "a" else "a"
        pipe.delete_adapters(current["names"])
        current.update(names=load(loras.other if prefix == "b" else loras.files, prefix), prefix=prefix)

    return stats, switch


def _fp16_vae_tiles(pipe, tile: int) -> None:
    """Keep the VAE in fp16 (no fp32 upcast) and tile its decode at ``tile`` pixels, blending seams as diffusers
    does."""
    from ..optimizer.vae import set_vae_tiles

    vae = pipe.vae
    if getattr(vae.config, "force_upcast", False):
        vae.register_to_config(force_upcast=False)
    set_vae_tiles(vae, tile, blend_at_once=False)


def _prepare_diffusers(recipe: Recipe, path: str, device, dtype, call: dict, loras: LoraSets | None) -> Prepared:
    import contextlib

    import torch

    from ..optimizer.context import denoiser_of
    from ..optimizer.offload import vae_needs_upcast
    from ..optimizer.vae import vae_decode_dtype
    from ..pipeline.files import load_diffusers_pipeline
    from ..planner import BlockTimer, StepTimer, Workload, cache_was_empty, denoiser_blocks, model_key, record_measured

    if recipe.needs_cuda and not device.is_cuda:
        raise RecipeSkipped(f"{recipe.name} installs offload hooks and needs a CUDA device")
    pipe = load_diffusers_pipeline(path, dtype=dtype)
    lora_stats, switch = _load_diffusers_loras(pipe, loras) if loras else ({}, None)
    target = device.torch_device
    if recipe.setting == "none":
        pipe.to(target)
        detail = f"pipe.to({target!r})"
    elif recipe.setting == "model_offload":
        pipe.enable_model_cpu_offload(device=target)
        detail = "enable_model_cpu_offload()"
    elif recipe.setting == "sequential":
        pipe.enable_sequential_cpu_offload(device=target)
        detail = "enable_sequential_cpu_offload()"
    elif recipe.setting == "group_stream":
        _fp16_vae_tiles(pipe, 512)
        pipe.enable_group_offload(
            onload_device=torch.device(target), offload_device=torch.device("cpu"),
            offload_type="leaf_level", use_stream=True,
        )
        detail = "enable_group_offload(leaf_level, use_stream=True), VAE fp16 tiles 512"
    elif recipe.setting == "layerwise_fp8":
        denoiser_of(pipe).enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        pipe.enable_model_cpu_offload(device=target)
        detail = "denoiser enable_layerwise_casting(float8_e4m3fn), enable_model_cpu_offload()"
    else:  # the table above is the only source of settings
        raise AssertionError(recipe.setting)

    stats: dict = dict(lora_stats)

    def generate():
        timer = StepTimer.on(device)
        # the baseline's step and blocks are the card's facts for the model alone, not with adapters
        baseline = recipe.setting == "none" and device.is_cuda and not loras
        blocks = BlockTimer(device, denoiser_of(pipe), denoiser_blocks(pipe)) if baseline else contextlib.nullcontext()
        snapshot = device.snapshot()
        start = snapshot.allocated  # the weights: the worker's monitor has just reset the peak
        empty_cache = cache_was_empty(start, snapshot.reserved)  # else cached blocks would count as fragmentation
        timer.begin()
        began = time.perf_counter()
        with blocks:
            images = pipe(
                prompt=call["prompt"], num_inference_steps=call["steps"], width=call["width"], height=call["height"],
                generator=torch.Generator(device="cpu").manual_seed(call["seed"]), output_type="pil",
                callback_on_step_end=timer.callback(),
            ).images
        timer.finish()
        seconds = time.perf_counter() - began
        stats.update(step_seconds=timer.step_seconds, decode_seconds=timer.decode_seconds,
                     first_step_seconds=timer.first_seconds)
        if baseline and timer.step_seconds:
            # The uncapped, unoffloaded run is the card's compute time and activation memory for this model: the
            # planner predicts from them.
            size = images[0].size if images else (call["width"], call["height"])
            denoise, decode = timer.reserves(start, device.peak_allocated_bytes())
            record_measured(
                device, model_key(pipe, dtype),
                Workload(size[0], size[1], 1, call["steps"], vae_fp32=vae_needs_upcast(pipe)),
                step_seconds=timer.step_seconds, decode_seconds=timer.decode_seconds,
                denoise_reserve=denoise, decode_reserve=decode, block_timeline=blocks.timeline(),
                host_forward_seconds=blocks.host_forward_seconds,  # the host's time to issue one forward
                fragmentation_reserve=timer.fragmentation if empty_cache else None,
                # encoding, the scheduler and the image's conversion: a planned image's time until it measures its own
                other_seconds=max(1e-5, seconds - call["steps"] * timer.step_seconds - (timer.decode_seconds or 0.0)),
            )
        return images

    stats["vae_decode"] = vae_decode_dtype(pipe)  # SDXL's fp16 VAE decodes in fp32 under diffusers' upcast
    if loras:
        detail = f"load_lora_weights × {len(loras.files)}, set_adapters; {detail}"
    return Prepared(generate, pipe, None, detail, stats, switch=switch)


def _prepare_mlnb(recipe: Recipe, path: str, device, dtype, call: dict, loras: LoraSets | None) -> Prepared:
    from ..optimizer.offload import vae_needs_upcast
    from ..optimizer.vae import vae_decode_dtype
    from ..pipeline import load_pipeline
    from ..planner import Workload, card_facts, streamed_step, streamer_of

    extra = {"loras": list(loras.files)} if loras else {}
    if recipe.setting == "plan":
        if not device.is_cuda:
            raise RecipeSkipped("mlnb-plan places weights for a VRAM budget and needs a CUDA device")
        managed = load_pipeline(path, budget=device.free_bytes(), dtype=dtype, device=device, **extra)
    else:
        managed = load_pipeline(path, level=recipe.setting, dtype=dtype, device=device, **extra)

    stats: dict = {}
    sets = [list(loras.other), list(loras.files)] if loras else []
    if loras:
        stats.update(lora_mode="unfused", adapter_bytes=sum(a.nbytes for a in managed.loras))

    def switch():  # to the other set, and back at the next call
        managed.set_loras(sets[0])
        sets.reverse()

    def generate():
        result = managed.generate(
            call["prompt"], steps=call["steps"], width=call["width"], height=call["height"], seed=call["seed"]
        )
        if result.allocator_in_steps:  # frees in the steady loop synchronize the device in the middle of the steps
            stats["allocator_loop"] = dict(result.allocator_in_steps)
        # The prediction of the first image (a warm-up) comes before this plan measured anything on the card.
        stats.setdefault("first_predicted_seconds", result.predicted_seconds)
        stats.update(
            step_seconds=result.step_seconds, decode_seconds=result.decode_seconds,
            predicted_peak=result.predicted_peak, predicted_seconds=result.predicted_seconds,
            cleanup_seconds=result.memory.cleanup_seconds,
            cleanup_steps=list(result.memory.cleanup),  # a gc.collect among them: the cache clear left memory held
            cleanup_timings=[[step, round(seconds, 4)] for step, seconds in result.memory.cleanup_timings],
            cleanup_freed=result.memory.freed,  # reserved bytes the cache clear gave back (what it cost to free)
            # what asked for a gc.collect (allocated above the start after the cache clear), and what it gave back:
            # a cycle (given back) or memory that stays live (nothing), which would ask again each image
            cleanup_held=result.memory.held_after_clear, cleanup_collected=result.memory.collected,
            first_step_seconds=result.first_step_seconds,  # prompt encoding and the first step
            phase_seconds={k: round(v, 4) for k, v in result.phase_seconds.items()},
        )
        streamer = streamer_of(managed.pipe)
        if streamer is not None:  # whether blocks were prefetched on a copy stream (False: every block copied blocking)
            stats["prefetch_chain"] = streamer.chained and streamer.stream is not None
        return result.images

    def after():
        if managed.plan is not None and managed.plan.streamed and managed.plan_facts is not None:
            # The step the schedule replay gives for this plan against the card's resident block timeline (None
            # without one): beside the measured step, it tells the copies' order from everything else.
            work = Workload(call["width"], call["height"], 1, call["steps"], vae_fp32=vae_needs_upcast(managed.pipe))
            card = card_facts(device, managed.model_key, work, measure=False)
            stats["replayed_step_seconds"] = streamed_step(managed.plan, managed.plan_facts, card, calibrated=False)

    detail = managed.techniques.summary()
    if managed.plan is not None:
        detail = str(managed.plan)
    elif managed.choice.auto:
        detail = f"{managed.choice}: {detail}"
    stats["vae_decode"] = vae_decode_dtype(managed.pipe)  # bf16 for SDXL on a card that computes it
    return Prepared(generate, managed.pipe, managed.level.value, detail, stats, after, switch if loras else None)


def prepare(recipe: Recipe, path: str, device, dtype, call: dict, loras: LoraSets | None = None) -> Prepared:
    """Load ``path`` the way ``recipe`` says and return a :class:`Prepared` that generates one image.

    Args:
        recipe: what to set up.
        path: the model folder (or hub id).
        device: the :class:`mlnb.device.Device` to run on.
        dtype: the weights' torch dtype.
        call: ``prompt``, ``steps``, ``width``, ``height`` and ``seed`` of every generation.
        loras: the LoRAs to load (and the set to switch to), or None for the model alone.

    Raises:
        RecipeSkipped: the recipe cannot run on this device.
    """
    prepare_family = _prepare_diffusers if recipe.family == "diffusers" else _prepare_mlnb
    prepared = prepare_family(recipe, path, device, dtype, call, loras)
    logger.debug("%s set up: %s", recipe.name, prepared.detail)
    return prepared
