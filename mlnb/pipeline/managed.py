"""``load_pipeline`` and ``ManagedPipeline``: load, optimize, cache, generate, clean up at every phase."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import logging
import numbers
import os
import secrets
import threading
import time
from typing import Callable

from ..device import Device, get_device
from ..errors import (
    GenerationInterrupted,
    InvalidArgumentError,
    LoadInterrupted,
    OutOfMemoryRescueError,
    UnloadInterrupted,
    UnsupportedPipelineError,
)
from ..levels import (
    LevelChoice,
    Technique,
    MemoryOptimizationConfig,
    OptimizationLevel,
    activation_reserve,
    choose_level,
    parse_level,
    stronger_level,
)
from ..monitor import MemoryMonitor, cleanup, frames_pinning, release_exception_frames
from ..notices import plan_not_applied
from ..optimizer import MemoryOptimizer, OptimizationReport
from ..optimizer.offload import vae_needs_upcast
from ..optimizer.budget import apply_plan, model_facts, model_key, plan_level
from ..optimizer.streaming import streamers_of
from ..optimizer.vae import decode_in_bf16, vae_decode_dtype
from ..optimizer.context import skipped
from ..plan import (
    BudgetError, ModelFacts, Plan, Workload, plan_for_budget, room_needed,
)
from ..card_facts import card_facts
from ..units import format_bytes, parse_bytes
from ..optimizer.weights import weight_bytes
from .loading import check_local_weights, default_dtype, dtype_name, load_diffusers_pipeline, parse_dtype, reads_pickle, resolve_model
from . import learning, room
from .result import GenerationResult
from .timing import StepTimer

logger = logging.getLogger(__name__)

__all__ = [
    "ManagedPipeline",
    "load_pipeline",
    "last_result",
    "cached_pipelines",
    "unload_all",
    "validate_generation_args",
    "MAX_SIDE",
    "MAX_IMAGES",
]

MAX_SIDE = 4096  # pixels; larger requests are almost always typos
MAX_IMAGES = 16

_cache: dict[tuple[str, str, str], "ManagedPipeline"] = {}
_cache_lock = threading.RLock()
_loading = threading.RLock()  # one load_pipeline reads and places a model at a time
_uses = itertools.count()  # the order pipelines were loaded or last generated with (room unloads the oldest first)
_last: list[GenerationResult] = []


def remember(result: GenerationResult) -> None:
    """Make ``result`` what :func:`last_result` returns."""
    _last[:] = [result]


def last_result() -> GenerationResult | None:
    """The last :class:`GenerationResult` produced in this process, or None."""
    return _last[-1] if _last else None


def cached_pipelines() -> list["ManagedPipeline"]:
    """The loaded pipelines, oldest first."""
    with _cache_lock:
        return list(_cache.values())


def unload_all(device: Device | None = None) -> int:
    """Unload every cached pipeline and clean up. Returns the number unloaded."""
    pipes = cached_pipelines()
    for managed in pipes:  # outside the cache's lock: an unload waits for the pipeline's generation to end
        managed.unload()
    cleanup(device or get_device())
    return len(pipes)


def validate_generation_args(
    prompt, steps: int, width: int | None, height: int | None, num_images: int, guidance: float | None,
    seed: int | None, spell: Callable[[str], str] = str,
) -> None:
    """Check generation arguments before any work. Raises :class:`InvalidArgumentError` naming the rule.

    ``width``/``height`` of None (the model's native size) pass; ``spell`` gives the name a message uses for an
    argument (``"num_images"`` → ``"--num-images"`` for the magic).
    """
    if not isinstance(prompt, str):
        raise InvalidArgumentError(f"the prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InvalidArgumentError("the prompt is empty: write it in the cell body (or pass prompt=...)")
    if not _whole(steps) or steps < 1:
        raise InvalidArgumentError(f"{spell('steps')} must be a whole number >= 1, got {steps!r}")
    for name, value in (("width", width), ("height", height)):
        if value is None:
            continue
        if not _whole(value) or value < 8 or value % 8:
            raise InvalidArgumentError(f"{spell(name)} must be a positive multiple of 8, got {value!r}")
        if value > MAX_SIDE:
            raise InvalidArgumentError(f"{spell(name)} must be at most {MAX_SIDE} px, got {value}")
    if not _whole(num_images) or not 1 <= num_images <= MAX_IMAGES:
        raise InvalidArgumentError(f"{spell('num_images')} must be between 1 and {MAX_IMAGES}, got {num_images!r}")
    if guidance is not None and (not isinstance(guidance, numbers.Real) or isinstance(guidance, bool)
                                 or not 0 <= guidance < float("inf")):
        raise InvalidArgumentError(f"{spell('guidance')} must be a finite number >= 0, got {guidance!r}")
    if seed is not None and (not _whole(seed) or not 0 <= seed < 2**63):
        raise InvalidArgumentError(f"{spell('seed')} must be a whole number in [0, 2**63), got {seed!r}")


def _whole(value) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# generate's own arguments, which the pipeline call gets from them: passed again through **pipeline_kwargs they would
# run something other than what the result records (its steps, seed, size), or return tensors instead of images.
_MANAGED_KWARGS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "num_inference_steps": "steps", "generator": "seed",
    "guidance_scale": "guidance", "width": "width", "height": "height", "num_images_per_prompt": "num_images",
    "output_type": None, "return_dict": None,
}


class ManagedPipeline:
    """A diffusers pipeline with its level applied, owned by mlnb's cache.

    Create it with :func:`load_pipeline`. ``generate`` runs inside a :class:`~mlnb.MemoryMonitor` and returns a
    :class:`~mlnb.GenerationResult`.
    """

    def __init__(
        self,
        pipe,
        model: str,
        dtype,
        choice: LevelChoice,
        techniques: OptimizationReport,
        device: Device,
        load_kwargs: dict,
        plan: Plan | None = None,
        plan_facts: ModelFacts | None = None,
        config: MemoryOptimizationConfig | None = None,
        read_pickle: bool = False,
    ) -> None:
        self.pipe = pipe
        self.read_pickle = read_pickle  # its weights may have come from pickle files (loaded with allow_pickle)
        self.plan = plan
        self.plan_facts = plan_facts  # the weight bytes the plan was made from (before fp8 storage)
        self.model = model
        self.dtype = dtype
        self.choice = choice
        self.techniques = techniques
        self.device = device
        self.load_kwargs = load_kwargs
        self.weight_bytes = weight_bytes(pipe) if pipe is not None else 0
        self.model_key = _model_key(pipe, dtype)
        self._config = config
        self._generating = threading.RLock()  # one generation at a time: the scheduler and hooks hold call state
        self.last_used = next(_uses)
        self.unloaded_for: str | None = None  # the model it was unloaded to make room for (mlnb.pipeline.room)
        self.unloaded_why: str | None = None  # said when it is used after mlnb unloaded it

    @property
    def level(self) -> OptimizationLevel:
        return self.choice.level

    @property
    def config(self) -> MemoryOptimizationConfig:
        """The techniques' settings it was loaded with (its level's, or the ``config`` given to ``load_pipeline``)."""
        return self._config if self._config is not None else MemoryOptimizationConfig.from_level(self.level)

    @property
    def loaded(self) -> bool:
        return self.pipe is not None

    @property
    def tag(self) -> str:
        """``"ultra"``, or ``"budget 4.0 GiB"`` for a planned pipeline."""
        return _budget_tag(self.plan.budget) if self.plan is not None else self.level.value

    @property
    def key(self) -> tuple[str, str, str]:
        """The cache key: model, dtype, and the exact budget, or the level with any settings of its own."""
        if self.plan is not None:
            return (self.model, dtype_name(self.dtype), _budget_key(self.plan.budget))
        return (self.model, dtype_name(self.dtype), _config_key(self.config))

    def default_size(self) -> tuple[int, int]:
        """The model's native resolution (``sample_size`` × VAE scale factor), e.g. 1024×1024 for SDXL."""
        return _native_size(self.pipe)

    def weights_location(self) -> dict[str, str]:
        """Where each component's weights live now: ``{"unet": "cpu", "vae": "cuda:0", ...}``."""
        import torch

        where = {}
        if self.pipe is None:
            return where
        for name, component in self.pipe.components.items():
            if isinstance(component, torch.nn.Module):
                devices = sorted({str(p.device) for p in component.parameters()})
                where[name] = "+".join(devices) if devices else "-"
        return where

    def generate(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        steps: int = 30,
        guidance: float | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        progress: Callable[[int, int], None] | None = None,
        **pipeline_kwargs,
    ) -> GenerationResult:
        """Generate images; memory is measured and cleaned up whatever happens.

        Args:
            prompt: the text prompt.
            negative_prompt: what to steer away from.
            steps: denoising steps.
            guidance: classifier-free guidance scale (the pipeline's default when None).
            seed: the seed; drawn at random and recorded when None. The same seed gives the same image.
            width, height: pixels, multiples of 8 (the model's native size when None).
            num_images: images per prompt.
            progress: called as ``progress(step, total)`` after each denoising step.
            **pipeline_kwargs: passed through to the pipeline call, except what generate sets itself
                (``num_inference_steps``, ``generator``, ``guidance_scale``, ``num_images_per_prompt``, ``width``,
                ``height``, ``output_type``...): those are refused with the argument to use. A
                ``callback_on_step_end`` runs after mlnb's own step callback, and its returned tensors are used.

        One generation runs at a time on a pipeline: a second call from another thread (the dashboard's button
        beside a running cell) waits for the first.

        Raises:
            InvalidArgumentError: a bad argument, before any work.
            UnsupportedPipelineError: the pipeline does not take text-to-image arguments.
            GenerationInterrupted: on KeyboardInterrupt; memory is freed and the pipeline stays loaded.

        Example:
            ```python
            >>> result = mlnb.load_pipeline(folder).generate("a watercolor fox", steps=20, seed=1)
            >>> result.images[0], result.report_line()
            ```
        """
        interrupted = GenerationInterrupted(
            f"interrupted while waiting for the generation of {self.model!r} in another thread; nothing was generated"
        )
        with self._turn("this generation", interrupted):  # a second caller (the dashboard's button) waits
            return self._generate(prompt, negative_prompt, steps, guidance, seed, width, height, num_images, progress,
                                  pipeline_kwargs)

    @contextlib.contextmanager
    def _turn(self, what: str, interrupted: Exception):
        """Hold the pipeline's generation lock; while another thread generates, say that ``what`` waits, and turn
        Ctrl-C during the wait into ``interrupted`` (one line)."""
        if not self._generating.acquire(blocking=False):
            logger.warning("%s is generating in another thread (the dashboard's?): %s waits for it to finish",
                           self.model, what)
            try:
                self._generating.acquire()
            except KeyboardInterrupt:
                raise interrupted from None
        try:
            yield
        finally:
            self._generating.release()

    def _generate(self, prompt, negative_prompt, steps, guidance, seed, width, height, num_images, progress,
                  pipeline_kwargs) -> GenerationResult:
        entered = time.perf_counter()
        if self.pipe is None:
            why = f" {self.unloaded_why}" if self.unloaded_why else ""
            raise InvalidArgumentError(
                f"pipeline {self.model!r} was unloaded{why}; load it again with mlnb.load_pipeline"
            )
        self.last_used = next(_uses)
        default_w, default_h = self.default_size()
        width = default_w if width is None else width
        height = default_h if height is None else height
        validate_generation_args(prompt, steps, width, height, num_images, guidance, seed)
        steps, width, height, num_images = int(steps), int(width), int(height), int(num_images)
        seed = secrets.randbits(31) if seed is None else int(seed)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise InvalidArgumentError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        if progress is not None and not callable(progress):
            raise InvalidArgumentError(f"progress must be a function of (step, total), got {type(progress).__name__}")
        user_callback = _user_callback(pipeline_kwargs)
        accepted = text_to_image_parameters(self.pipe)
        kwargs = self._call_kwargs(accepted, prompt, negative_prompt, steps, guidance, seed, width, height, num_images)
        timer = StepTimer.on(self.device)
        loop: dict[int, dict[str, int]] = {}  # the allocator's counters after the first and the last step

        def after(step: int) -> None:
            if self.device.is_cuda and step in (0, steps - 1):
                loop[step] = self.device.allocator_counters()
            if progress is not None:
                progress(step + 1, steps)

        if "callback_on_step_end" in accepted:
            kwargs["callback_on_step_end"] = timer.callback(after, then=user_callback)
        elif user_callback is not None:
            raise UnsupportedPipelineError(f"{type(self.pipe).__name__} takes no callback_on_step_end")
        kwargs.update(pipeline_kwargs)
        work = Workload(width, height, num_images, steps, vae_fp32=vae_needs_upcast(self.pipe))
        # Without a GPU the plan is not applied: nothing to predict, nothing to warn about.
        predicted_peak, predicted_seconds = (
            self._predict_warning_over_budget(work) if self.device.has_memory_counters else (None, None)
        )
        needed = room_needed(predicted_peak) if predicted_peak is not None else 0
        free = self.device.free_bytes() if needed else None
        if free is not None and free < needed:  # other models' weights out of the way of the plan's peak
            try:  # what this pipeline already holds there is part of its peak (walked only when short of room)
                room.make_room(needed - room.gpu_bytes(self), self.device, self.model)
            except KeyboardInterrupt:
                raise GenerationInterrupted(
                    f"interrupted while making room on the GPU; {self.model!r} stays loaded"
                ) from None
        if guidance is None:
            sig = inspect.signature(self.pipe.__call__).parameters.get("guidance_scale")
            guidance = sig.default if sig is not None and sig.default is not inspect.Parameter.empty else None

        config = self.config
        blocks = learning.block_timer(self)
        # A full gc.collect only when the cache clear left GPU memory held (a cycle); errors always collect.
        monitor = MemoryMonitor(
            self.device, collect="if_needed" if config.gc_collect else False, empty_cache=config.cuda_cache_clear
        )
        images, start, seconds, cleaned = self._run(kwargs, timer, blocks, monitor)
        params = dict(
            prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
            width=width, height=height, num_images=num_images,
        )
        result = GenerationResult(
            images=images, seed=seed, params=params, memory=monitor.report, seconds=seconds,
            level=self.level, techniques=self.techniques, model=self.model,
            plan=str(self.plan) if self.plan is not None else None,
            predicted_peak=predicted_peak, predicted_seconds=predicted_seconds,
            step_seconds=timer.step_seconds, decode_seconds=timer.decode_seconds,
            first_step_seconds=timer.first_seconds,
        )
        if loop.get(0) and steps > 1 and loop.get(steps - 1):
            result.allocator_in_steps.update({k: v - loop[0][k] for k, v in loop[steps - 1].items()})
        learning.record(self, work, timer, monitor.report, cleaned - entered, blocks)
        learning.room_for_the_allocator(self, work, timer, result.allocator_in_steps)
        result.phase_seconds.update(
            before=start - entered, pipeline=seconds, cleanup=cleaned - start - seconds,  # the monitor's exit
            after=time.perf_counter() - cleaned,
        )
        remember(result)
        return result

    def _run(self, kwargs: dict, timer: StepTimer, blocks, monitor: MemoryMonitor) -> tuple[list, float, float, float]:
        """The pipeline call inside ``monitor``: (images, when the call started, its seconds, when the monitor's
        cleanup ended). Streamed blocks go home whatever happens; an interrupt is a one-line error."""
        try:
            with monitor:
                start = time.perf_counter()
                try:
                    timer.begin()
                    with blocks:
                        output = self.pipe(**kwargs)
                    images = list(output.images)
                    del output
                    timer.finish()
                    for streamer in streamers_of(self.pipe):  # slots kept across the steps (a decode drops them)
                        streamer.release()
                except BaseException as exc:
                    # The frames that pin memory the cache does not keep (latents, a failing layer's workspace) let
                    # it go; the others (a user's step callback) keep their locals for %debug.
                    release_exception_frames(exc, frames_pinning(self.device, spare=(self.pipe,)))
                    for streamer in streamers_of(self.pipe):  # a prefetched block would stay on the GPU
                        try:
                            streamer.offload_all()
                        except Exception as cleanup_exc:  # the error being raised is the one to report
                            logger.debug("offloading streamed blocks after an error failed: %s", cleanup_exc)
                    raise
                seconds = time.perf_counter() - start
            return images, start, seconds, time.perf_counter()
        except KeyboardInterrupt:
            raise GenerationInterrupted(
                f"generation interrupted; memory freed ({monitor.report.summary() if monitor.report else 'N/A'}), "
                f"{self.model!r} stays loaded"
            ) from None

    def _call_kwargs(self, accepted: set[str], prompt, negative_prompt, steps, guidance, seed, width, height,
                     num_images) -> dict:
        """The pipeline call's own arguments (PIL output, a CPU generator seeded with ``seed``)."""
        import torch

        kwargs = {
            "prompt": prompt, "num_inference_steps": steps, "width": width, "height": height,
            "generator": torch.Generator(device="cpu").manual_seed(seed), "output_type": "pil",
        }
        if negative_prompt:
            kwargs["negative_prompt"] = negative_prompt
        if guidance is not None and "guidance_scale" in accepted:
            kwargs["guidance_scale"] = float(guidance)
        if "num_images_per_prompt" in accepted:
            kwargs["num_images_per_prompt"] = num_images
        elif num_images != 1:
            raise UnsupportedPipelineError(f"{type(self.pipe).__name__} makes one image per call")
        return kwargs

    def _predict_warning_over_budget(self, work: Workload) -> tuple[int | None, float | None]:
        """:meth:`predict`, with a warning when the size asked for needs more than the plan's budget."""
        peak, seconds = self.predict(work)
        if peak is not None and peak > self.plan.budget:
            logger.warning(
                "%d×%d ×%d is predicted to need %s, more than the %s plan (made for the native size); "
                "a smaller size, or a new plan for this size, fits", work.width, work.height, work.batch,
                format_bytes(peak), format_bytes(self.plan.budget),
            )
        return peak, seconds

    def predict(self, work: Workload) -> tuple[int | None, float | None]:
        """The plan's predicted peak bytes and seconds for ``work``; ``(None, None)`` without a plan.

        Card facts are read again each time, so a step time measured since loading improves the prediction.
        """
        return learning.predict(self, work)

    def unload(self) -> None:
        """Drop the pipeline (hooks, weights, pinned copies) from the cache and clean up. A generation running on it
        in another thread (the dashboard's) finishes first."""
        interrupted = UnloadInterrupted(
            f"interrupted while waiting for the generation of {self.model!r} in another thread; it stays loaded"
        )
        with self._turn("unloading it", interrupted):  # first: interrupted while waiting, it stays cached and loaded
            with _cache_lock:
                if _cache.get(self.key) is self:
                    del _cache[self.key]
            pipe, self.pipe = self.pipe, None
        if pipe is not None:
            try:
                if hasattr(pipe, "remove_all_hooks"):
                    pipe.remove_all_hooks()
            except Exception as exc:  # hooks of a failed load can be half-installed; dropping the object is enough
                logger.debug("remove_all_hooks failed: %s", exc)
            del pipe
        cleanup(self.device)

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "unloaded"
        bf16 = ", VAE decodes in bf16" if vae_decode_dtype(self.pipe) == "bf16" else ""
        return (
            f"ManagedPipeline({self.model!r}, {dtype_name(self.dtype)}, level {self.level.value}: "
            f"{self.techniques.summary()}{bf16}; {format_bytes(self.weight_bytes)} weights, {state})"
        )


def _level_from_table(pipe, free: int | None) -> LevelChoice:
    """The level table's choice for the free VRAM, the weights and one native-size image's activations."""
    w, h = _native_size(pipe)
    reserve = activation_reserve(w, h, 1, vae_fp32=vae_needs_upcast(pipe))
    return choose_level(free, weight_bytes(pipe), reserve)


def load_pipeline(
    model: str | os.PathLike,
    level: str | OptimizationLevel = "auto",
    dtype=None,
    allow_pickle: bool = False,
    device: Device | None = None,
    config: MemoryOptimizationConfig | None = None,
    budget: int | str | None = None,
    **from_pretrained_kwargs,
) -> ManagedPipeline:
    """Load a diffusers pipeline, apply a memory level, and cache it by (model, dtype, level).

    Args:
        model: a hub id (``org/name``) or a local diffusers folder.
        level: ``"auto"`` (chosen from free VRAM and the model's size), ``"none"``, ``"balanced"``,
            ``"aggressive"`` or ``"ultra"``.
        dtype: weights dtype; default fp16 on CUDA (bf16 for transformer pipelines where supported), fp32 on CPU.
        allow_pickle: accept pickle weights. Off by default: pickle can run code when loaded.
        device: the device to use (default: the current device).
        config: explicit technique settings (overrides ``level``'s).
        budget: a VRAM budget (``"4GiB"`` or bytes) instead of a level: the planner keeps what fits resident and
            streams the rest (see :mod:`mlnb.plan`); it prints its predicted peak. Overrides ``level``.
        **from_pretrained_kwargs: passed to ``DiffusionPipeline.from_pretrained`` (``variant``, ``revision``...).

    Returns:
        A :class:`ManagedPipeline`. A second call with the same model, dtype and level returns the cached one.

    Example:
        ```python
        >>> import mlnb
        >>> pipe = mlnb.load_pipeline("stabilityai/stable-diffusion-xl-base-1.0", level="auto")
        >>> result = pipe.generate("a watercolor fox", steps=20, seed=1)
        ```
    """
    device = device or get_device()
    requested, budget_bytes = _load_arguments(model, level, config, budget)
    source, is_local = resolve_model(model)
    torch_dtype = parse_dtype(dtype) or default_dtype(device, source if is_local else None)
    dname = dtype_name(torch_dtype)

    hit = _cached(source, dname, budget_bytes, requested, config, device, from_pretrained_kwargs, allow_pickle)
    if hit is not None:
        return hit
    try:
        _loading.acquire()
    except KeyboardInterrupt:
        raise LoadInterrupted(f"interrupted while another load ran; {source!r} was not loaded") from None
    try:  # one load at a time: two would plan for the same free memory and hold two host copies at once
        hit = _cached(source, dname, budget_bytes, requested, config, device, from_pretrained_kwargs, allow_pickle)
        if hit is not None:  # loaded by the other thread meanwhile
            return hit
        return _load(source, is_local, torch_dtype, budget_bytes, requested, config, device, allow_pickle,
                     from_pretrained_kwargs)
    finally:
        _loading.release()


def _load(source: str, is_local: bool, torch_dtype, budget_bytes: int | None, requested: OptimizationLevel | None,
          config: MemoryOptimizationConfig | None, device: Device, allow_pickle: bool,
          from_pretrained_kwargs: dict) -> ManagedPipeline:
    """Read, check, place and cache a pipeline that the cache did not have (the rest of :func:`load_pipeline`)."""
    dname = dtype_name(torch_dtype)
    if is_local:  # a refusal needs no room: checked before a cached copy could go to make it
        check_local_weights(source, allow_pickle)
    _make_host_room(source, torch_dtype)
    try:
        pipe = load_diffusers_pipeline(source, dtype=torch_dtype, allow_pickle=allow_pickle, **from_pretrained_kwargs)
    except KeyboardInterrupt as exc:
        release_exception_frames(exc)  # the half-read weights
        cleanup(device)
        raise LoadInterrupted(
            f"loading {source!r} was interrupted; its memory was freed and nothing was cached"
        ) from None
    plan = cfg = facts = None
    try:
        text_to_image_parameters(pipe)  # refuse it before it is optimized and cached: it could never generate
        if vae_needs_upcast(pipe) and device.info().native_bf16 and decode_in_bf16(pipe):
            # before planning: a bf16 decode needs half the memory of the fp32 one, so tiles are larger or none
            logger.info("the VAE decodes in bf16 on this card, not upcast to fp32 (half the memory, tensor cores)")
        choice, plan, facts = _choose(pipe, budget_bytes, requested, device, torch_dtype)
        cfg = config if config is not None else MemoryOptimizationConfig.from_level(choice.level)
        # The same model at another level, dtype or revision: drop the old copy first, a small card cannot hold
        # both (outside the cache's lock: an unload waits for the copy's generation to end).
        for other in cached_pipelines():
            if other.model == source:
                old, new = _differences(other, choice.level.value, dname, from_pretrained_kwargs, allow_pickle)
                logger.warning("unloading %s (%s) to load it again as %s", source, old, new)
                other.unloaded_why = f"to load it again as {new}"
                other.unload()
        needed = _room_for_load(pipe, plan, cfg, device)
        if needed:  # other models' weights out of the way of this one's peak
            room.make_room(needed, device, source)
        if plan is None:
            report = MemoryOptimizer(cfg, device).optimize_pipeline(pipe)
        elif device.is_cuda:
            report = apply_plan(pipe, plan, device.torch_device, use_stream=True, ctx_device=device)
        else:
            cleanup(device)
            report = OptimizationReport(
                plan_level(plan), tuple(skipped(t, "no CUDA device: the plan is computed, not applied") for t in Technique)
            )
    except BaseException as exc:
        del pipe
        # The frames that refused or placed it (the planner's, the optimizer's) still hold the pipeline: a refused
        # model would otherwise stay in memory through the stored traceback until the next error.
        release_exception_frames(exc)
        cleanup(device)
        if isinstance(exc, KeyboardInterrupt):
            raise LoadInterrupted(
                f"loading {source!r} was interrupted; its memory was freed and nothing was cached"
            ) from None
        if not device.is_oom(exc):
            raise
        stronger = stronger_level(cfg.level) if cfg is not None else None
        advice = f"try --level {stronger.value}" if stronger else "%vram who shows what holds GPU memory"
        at = f" at level {cfg.level.value}" if cfg is not None else ""
        raise OutOfMemoryRescueError(f"out of GPU memory loading {source!r}{at}; {advice}") from None
    load_kwargs = dict(from_pretrained_kwargs, allow_pickle=allow_pickle)
    managed = ManagedPipeline(
        pipe, source, torch_dtype, choice, report, device, load_kwargs, plan=plan, plan_facts=facts, config=config,
        read_pickle=reads_pickle(source, is_local, allow_pickle),
    )
    with _cache_lock:
        _cache[managed.key] = managed
    logger.debug("loaded %r", managed)
    return managed


def _make_host_room(source: str, torch_dtype) -> None:
    """Unload cached copies of ``source`` before reading it again when host RAM cannot hold a second copy beside
    them (Colab has 12.7 GB: two SDXL copies are more, and a kernel out of host RAM dies without an error). With
    room, the old copy is dropped only once the new one has loaded, so a failed load loses nothing."""
    from ..device import host_memory

    copies = [m for m in cached_pipelines() if m.model == source]
    if not copies:
        return
    available = host_memory()[1]
    new = max(m.weight_bytes * torch_dtype.itemsize // m.dtype.itemsize for m in copies)
    if available is None or new * 1.1 < available:
        return
    for other in copies:
        logger.warning(
            "unloading %s (%s) before reading it again: host RAM has %s available, the new copy needs about %s",
            source, other.tag, format_bytes(available), format_bytes(new),
        )
        other.unloaded_why = "to free host RAM before reading it again"
        other.unload()


def _room_for_load(pipe, plan: Plan | None, config: MemoryOptimizationConfig, device: Device) -> int:
    """The free bytes a load must find on the GPU: a plan's peak with its margin; for a pipeline kept whole on the
    GPU (level none), its weights and one native-size image's activations; 0 for the offloading levels, which put
    nothing there between calls (the OOM rescue makes room for them when a generation needs it)."""
    if plan is not None:
        return room_needed(plan.predicted_peak)
    if not device.is_cuda or any(getattr(config, t) for t in ("model_cpu_offload", "sequential_cpu_offload", "group_offload")):
        return 0
    w, h = _native_size(pipe)
    return weight_bytes(pipe) + activation_reserve(w, h, 1, vae_fp32=vae_needs_upcast(pipe))


def _load_arguments(model, level, config, budget) -> tuple[OptimizationLevel | None, int | None]:
    """Check ``load_pipeline``'s arguments before anything loads: (the level asked for, None for auto; the budget in
    bytes, or None). Raises :class:`InvalidArgumentError` naming the argument."""
    if config is not None and not isinstance(config, MemoryOptimizationConfig):
        raise InvalidArgumentError(f"config must be a MemoryOptimizationConfig, got {type(config).__name__}")
    try:
        asked = parse_level(level)
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None
    if config is not None and asked is not None and asked is not config.level:
        raise InvalidArgumentError(
            f"level {asked.value!r} and a config of level {config.level.value!r}: the config sets the level, give one"
        )
    try:
        budget_bytes = parse_bytes(budget) if budget is not None else None
    except ValueError as exc:
        raise InvalidArgumentError(f"budget: {exc}") from None
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidArgumentError(f"model must be a hub id (org/name) or a folder path, got {type(model).__name__}")
    return (config.level if config is not None else asked), budget_bytes


def _choose(pipe, budget: int | None, requested: OptimizationLevel | None, device: Device,
            dtype) -> tuple[LevelChoice, Plan | None, ModelFacts | None]:
    """The level for a load, and the plan behind it when there is one: a budget's plan; for auto, on a CUDA card the
    plan for the memory free now (the level table when nothing fits that), elsewhere the table; else the level."""
    if budget is not None:
        plan, facts = _plan(pipe, budget, device, dtype)
        return LevelChoice(plan_level(plan), f"plan for {format_bytes(budget)}: {plan.summary()}", auto=False), plan, facts
    if requested is not None:
        return LevelChoice(requested, "chosen by the user", auto=False), None, None
    free = device.free_bytes()
    if device.is_cuda and free is not None:
        # Planned for what is free; when nothing fits that, for what other cached pipelines hold on the GPU too (they
        # are unloaded as far as the plan needs). Unloading them first would make switching between two models
        # read each one's files again every time.
        held = sum(held for _, held in room.holders(device, besides=""))
        tries = [(f"the {format_bytes(free)} free", free)]
        if held:
            tries.append((f"the {format_bytes(free)} free and {format_bytes(held)} held by cached pipelines", free + held))
        error = None
        for room_for, budget in tries:
            if budget <= 0:
                continue
            try:
                plan, facts = _plan(pipe, budget, device, dtype)
            except InvalidArgumentError as exc:
                error = exc
                continue
            return LevelChoice(plan_level(plan), f"plan for {room_for}: {plan.summary()}"), plan, facts
        if error is not None:  # nothing fits: the strongest fixed level
            logger.warning("auto: %s; falling back to the level table", error)
    return _level_from_table(pipe, free), None, None


def _cached(source: str, dname: str, budget: int | None, requested: OptimizationLevel | None,
            config: MemoryOptimizationConfig | None, device: Device, kwargs: dict, allow_pickle: bool):
    """The cached pipeline that answers this load, or None."""
    with _cache_lock:
        if budget is not None:
            hit = _cache.get((source, dname, _budget_key(budget)))
        elif requested is not None:
            wanted = config if config is not None else MemoryOptimizationConfig.from_level(requested)
            hit = _cache.get((source, dname, _config_key(wanted)))
        else:
            # auto: any cached level of this model that auto chose before is reused; on a CPU auto is `none`
            # (nothing to offload to), so a `none` loaded by name is what auto would load again.
            hit = next((m for m in _cache.values()
                        if m.model == source and dtype_name(m.dtype) == dname and m.choice.auto), None)
            if hit is None and not device.has_memory_counters:  # a CPU: the table says none
                hit = _cache.get((source, dname, _config_key(MemoryOptimizationConfig.from_level("none"))))
        if hit is None or not _serves(hit, kwargs, allow_pickle):
            return None
        hit.last_used = next(_uses)  # asked for again: the last to make room
        return hit


def _serves(managed: "ManagedPipeline", kwargs: dict, allow_pickle: bool) -> bool:
    """Whether a cached pipeline answers a load with these ``from_pretrained`` arguments: the same ones (another
    variant or revision is other weights), and weights read from pickle files only for a call that accepts pickle."""
    return _given(managed.load_kwargs) == _given(kwargs) and (allow_pickle or not managed.read_pickle)


def _given(kwargs: dict) -> dict:
    """``from_pretrained`` arguments as they choose weights: ``variant=None`` is the same as no variant."""
    return {k: v for k, v in kwargs.items() if k != "allow_pickle" and v is not None}


def _differences(other: "ManagedPipeline", level: str, dname: str, kwargs: dict, allow_pickle: bool) -> tuple[str, str]:
    """How a cached copy and the load replacing it differ, as the unload warning says it: (old, new)."""
    old, new = [other.tag], [level]
    if dtype_name(other.dtype) != dname:
        old.append(dtype_name(other.dtype))
        new.append(dname)
    theirs, ours = _given(other.load_kwargs), _given(kwargs)
    for name in sorted(set(theirs) | set(ours)):
        if theirs.get(name) != ours.get(name):
            old.append(f"{name}={theirs.get(name)!r}")
            new.append(f"{name}={ours.get(name)!r}")
    if other.read_pickle and not allow_pickle:
        old.append("pickle weights")
        new.append("safetensors only")
    return ", ".join(old), ", ".join(new)


def _user_callback(pipeline_kwargs: dict):
    """Refuse the pipeline arguments generate sets itself, and take a user's ``callback_on_step_end`` out of
    ``pipeline_kwargs`` (it runs after mlnb's own)."""
    for name in sorted(set(pipeline_kwargs) & set(_MANAGED_KWARGS)):
        own = _MANAGED_KWARGS[name]
        raise InvalidArgumentError(
            f"{name} is set by generate: pass {own}= instead" if own else
            f"{name} is set by generate (PIL images, which the result shows and saves)"
        )
    user_callback = pipeline_kwargs.pop("callback_on_step_end", None)
    if user_callback is not None and not callable(user_callback):
        raise InvalidArgumentError("callback_on_step_end must be a function")
    return user_callback


def _model_key(pipe, dtype) -> str | None:
    """The step-timing cache key, or ``None`` for a pipeline without a UNet or transformer (nothing to time)."""
    if pipe is None:
        return None
    try:
        return model_key(pipe, dtype)
    except ValueError:
        return None


def _budget_tag(budget: int) -> str:
    return f"budget {format_bytes(budget)}"


def _budget_key(budget: int) -> str:
    """Exact bytes: two budgets shown alike ("3.7 GiB") are two plans, and the larger must not serve the smaller."""
    return f"budget {budget} B"


def _config_key(config: MemoryOptimizationConfig) -> str:
    """The level, and the settings that differ from the level's own (a config of the user's is its own entry)."""
    own = MemoryOptimizationConfig.from_level(config.level)
    changed = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
               if getattr(config, f.name) != getattr(own, f.name)]
    return config.level.value + (f" ({', '.join(changed)})" if changed else "")


def _plan(pipe, budget: int, device: Device, dtype) -> tuple[Plan, ModelFacts]:
    """The budget plan for ``pipe`` at its native size (30 steps); a budget nothing fits is a one-line error."""
    w, h = _native_size(pipe)
    work = Workload(w, h, 1, steps=30, vae_fp32=vae_needs_upcast(pipe))
    try:
        facts = model_facts(pipe)
        plan = plan_for_budget(budget, facts, card_facts(device, model_key(pipe, dtype), work), work)
    except (BudgetError, ValueError) as exc:  # nothing fits, or no UNet/transformer to plan for
        raise InvalidArgumentError(str(exc)) from None
    logger.warning("%s", plan if device.has_memory_counters else plan_not_applied(plan))
    return plan, facts


def text_to_image_parameters(pipe) -> set[str]:
    """The parameters of ``pipe.__call__``.

    Raises:
        UnsupportedPipelineError: the call lacks one of prompt, num_inference_steps, width, height, generator.
    """
    accepted = set(inspect.signature(pipe.__call__).parameters)
    missing = sorted({"prompt", "num_inference_steps", "width", "height", "generator"} - accepted)
    if missing:
        raise UnsupportedPipelineError(
            f"{type(pipe).__name__} is not a text-to-image pipeline mlnb can drive (its call lacks {', '.join(missing)})"
        )
    return accepted


def _native_size(pipe) -> tuple[int, int]:
    """The model's native resolution: the denoiser's ``sample_size`` times the VAE scale factor."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    size = getattr(getattr(denoiser, "config", None), "sample_size", 64) or 64
    if isinstance(size, (list, tuple)):
        size = size[0]
    scale = getattr(pipe, "vae_scale_factor", 8)
    return int(size) * scale, int(size) * scale
