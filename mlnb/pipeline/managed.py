"""``ManagedPipeline``: a loaded diffusers pipeline with its memory setting applied, which generates inside a
:class:`~mlnb.MemoryMonitor`, cleans up whatever happens, and returns a :class:`~mlnb.GenerationResult`."""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from typing import Callable

from ..device import Device
from ..errors import GenerationInterrupted, InvalidArgumentError, UnloadInterrupted, UnsupportedPipelineError
from ..levels import LevelChoice, MemoryOptimizationConfig, OptimizationLevel
from ..monitor import MemoryMonitor, cleanup
from ..optimizer import OptimizationReport
from ..optimizer.offload import vae_needs_upcast
from ..optimizer.vae import vae_decode_dtype
from ..optimizer.weights import weight_bytes
from ..planner import (
    LearningContext, ModelFacts, Plan, StepTimer, Workload, learning, model_key, native_size, room_needed,
)
from ..planner.blocks import with_adapters
from ..setting import MemorySetting
from ..units import format_bytes
from . import cache
from .adapters import ActiveLora, active_loras
from .adapters import set_loras as apply_loras
from .call import call_arguments, call_default, monitored_call, output_size, preflight
from .files import dtype_name
from .finite import FiniteGuard
from .images import pipeline_for
from .loras import LoraSpec
from .precision import pipeline_family
from .result import GenerationResult
from .validation import GenerationArgs, check_progress, text_to_image_parameters

logger = logging.getLogger(__name__)

__all__ = ["ManagedPipeline"]


class ManagedPipeline:
    """A diffusers pipeline with its memory setting applied, owned by mlnb's cache.

    Create it with :func:`~mlnb.load_pipeline`. ``generate`` runs inside a :class:`~mlnb.MemoryMonitor` and returns
    a :class:`~mlnb.GenerationResult`.

    Attributes:
        pipe: the diffusers pipeline (None once unloaded).
        model: the hub id or the folder's absolute path.
        setting: the memory setting it was loaded for (``auto``, a level, a budget or a config), as the user gave it.
        choice: the level it runs at, and why.
        plan: the budget plan that placed it, if any.
        techniques: the applied/skipped list of its techniques.
    """

    def __init__(
        self,
        pipe,
        model: str,
        dtype,
        setting: MemorySetting,
        choice: LevelChoice,
        techniques: OptimizationReport,
        device: Device,
        load_kwargs: dict,
        plan: Plan | None = None,
        plan_facts: ModelFacts | None = None,
        read_pickle: bool = False,
    ) -> None:
        self.pipe = pipe
        self.read_pickle = read_pickle  # its weights may have come from pickle files (loaded with allow_pickle)
        self.setting = setting
        self.plan = plan
        self.plan_facts = plan_facts  # the weight bytes the plan was made from (before fp8 storage), adapters added
        self._base_facts = plan_facts  # the same without adapters
        self.model = model
        self.dtype = dtype
        self.choice = choice
        self.techniques = techniques
        self.device = device
        self.load_kwargs = load_kwargs
        self.weight_bytes = weight_bytes(pipe) if pipe is not None else 0
        self.model_key = _model_key(pipe, dtype)
        self._generating = threading.RLock()  # one generation at a time: the scheduler and hooks hold call state
        self.last_used = 0  # the cache's use order (mlnb.pipeline.cache.touch)
        self.unloaded_for: str | None = None  # the model it was unloaded to make room for (mlnb.pipeline.cache)
        self.unloaded_why: str | None = None  # said when it is used after mlnb unloaded it
        # the LoRAs asked for last, kept past an unload so a reload (the OOM rescue) applies them again
        self.lora_specs: tuple[LoraSpec, ...] = ()
        self.loras_allow_pickle = False
        self._generating_in: int | None = None  # the thread generating on it now (see _own_generation)
        self._unload_when_done = False  # an unload asked for from inside that generation

    @property
    def level(self) -> OptimizationLevel:
        return self.choice.level

    @property
    def config(self) -> MemoryOptimizationConfig:
        """The techniques' settings it was loaded with (its level's, or the ``config`` given to ``load_pipeline``)."""
        own = self.setting.config
        return own if own is not None else MemoryOptimizationConfig.from_level(self.level)

    @property
    def loaded(self) -> bool:
        return self.pipe is not None

    @property
    def tag(self) -> str:
        """``"ultra"``, or ``"budget 4 GiB"`` for a planned pipeline."""
        return f"budget {self.setting.show_budget(self.plan.budget)}" if self.plan is not None else self.level.value

    @property
    def key(self) -> tuple[str, str, str]:
        """The cache key: model, dtype, and the setting it was placed with: the plan's exact budget, or the level with
        any settings of its own (what auto chose is what a later load naming it finds)."""
        placed = MemorySetting(budget=self.plan.budget) if self.plan is not None else MemorySetting.of_config(self.config)
        return (self.model, dtype_name(self.dtype), placed.key)

    # -- one generation at a time --------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Generating in another thread (the current thread's own generation does not count)."""
        with self.hold_if_idle() as idle:
            return not idle

    @contextlib.contextmanager
    def hold_if_idle(self):
        """Hold the pipeline's generation turn when no other thread has it: yields True while holding it, False
        (holding nothing) when another thread is generating."""
        idle = self._generating.acquire(blocking=False)
        try:
            yield idle
        finally:
            if idle:
                self._generating.release()

    @contextlib.contextmanager
    def hold(self, what: str = "this call", interrupted: Exception | None = None):
        """Hold the pipeline's generation turn, waiting for another thread's generation to end first; the wait is
        announced as ``what`` waiting, and Ctrl-C during it raises ``interrupted`` (one line)."""
        if not self._generating.acquire(blocking=False):
            logger.warning("%s is generating in another thread (the dashboard's?): %s waits for it to finish",
                           self.model, what)
            try:
                self._generating.acquire()
            except KeyboardInterrupt:
                if interrupted is None:
                    raise
                raise interrupted from None
        try:
            yield
        finally:
            self._generating.release()

    # -- facts -----------------------------------------------------------------------------------------------------

    def default_size(self) -> tuple[int, int]:
        """The model's native resolution (``sample_size`` × VAE scale factor), e.g. 1024×1024 for SDXL."""
        return native_size(self.pipe)

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

    def predict(self, work: Workload) -> tuple[int | None, float | None]:
        """The plan's predicted peak bytes and seconds for ``work``; ``(None, None)`` without a plan.

        The card facts are the ones known now, so a step time measured since loading improves the prediction.
        """
        return learning.predict(self.learning_context(), work)

    def learning_context(self) -> LearningContext:
        """What the planner's learning reads of this pipeline now (its plan may have been replaced since loading)."""
        return LearningContext(self.device, self.model_key, self.pipe, self.plan, self.plan_facts, self.techniques)

    # -- LoRAs -----------------------------------------------------------------------------------------------------

    @property
    def loras(self) -> tuple[ActiveLora, ...]:
        """The active LoRAs, in the order given, each with its spec (source, scale), adapter name and bytes."""
        return active_loras(self.pipe) if self.pipe is not None else ()

    def set_loras(self, loras, allow_pickle: bool = False) -> tuple[ActiveLora, ...]:
        """Apply exactly these LoRAs, unfused; an empty list removes them all and gives back the base weights
        bit-exactly. LoRAs already active are kept (only weighted anew), new ones are read and checked before any
        is applied, and no base weight is read from disk. It waits for a generation running in another thread.

        Args:
            loras: ``[path_or_id | (path_or_id, scale) | "PATH:SCALE" | LoraSpec, ...]``: ``.safetensors`` files,
                folders holding one, or hub ids.
            allow_pickle: accept pickle LoRA files (``.bin``, ``.pt``, ``.ckpt``). Off by default: pickle can run
                code when loaded.

        Returns:
            The active LoRAs (:attr:`loras`).

        Raises:
            InvalidArgumentError, ModelNotFoundError, UnsafeWeightsError, OfflineError, ModelLoadError: one line
                each, and the pipeline keeps the LoRAs it had.

        Example:
            ```python
            >>> pipe = mlnb.load_pipeline(folder)
            >>> pipe.set_loras(["ink.safetensors", ("paper.safetensors", 0.6)])
            >>> pipe.set_loras([])  # the base model again
            ```
        """
        interrupted = GenerationInterrupted(
            f"interrupted while waiting for the generation of {self.model!r} in another thread; its LoRAs are "
            "unchanged"
        )
        with self.hold("changing its LoRAs", interrupted):
            self._check_loaded()
            active = apply_loras(self.pipe, loras, allow_pickle)
            if self._base_facts is not None:  # the plan's predictions count the adapters where they live
                self.plan_facts = with_adapters(self._base_facts, self.pipe)
            self.lora_specs = tuple(a.spec for a in active)
            self.loras_allow_pickle = bool(allow_pickle)
            return active

    # -- generating ------------------------------------------------------------------------------------------------

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
        image=None,
        strength: float | None = None,
        mask_image=None,
        **pipeline_kwargs,
    ) -> GenerationResult:
        """Generate images; memory is measured and cleaned up whatever happens: after an error at once, else by the
        deferred release once the kernel is idle (:mod:`mlnb.monitor.release`), so back-to-back generations do not
        pay for a cache clear between them.

        With ``image`` it is image-to-image, and with ``mask_image`` too inpainting, run by diffusers' pipeline for
        that task made from the loaded components (no weight is read or copied; LoRAs and offloading apply alike).

        Args:
            prompt: the text prompt.
            negative_prompt: what to steer away from.
            steps: denoising steps.
            guidance: classifier-free guidance scale (the pipeline's default when None).
            seed: the seed; drawn at random and recorded when None. The same seed gives the same image.
            width, height: pixels, multiples of 8 (the model's native size when None).
            num_images: images per prompt.
            progress: called as ``progress(step, total)`` after each denoising step (``total``: the steps that
                run, ``strength`` × ``steps`` from an image).
            image: the start image (a path or a PIL image). Image-to-image makes an image of its size (rounded
                down to a multiple of 8) and takes no ``width``/``height``; inpainting takes them (default: the
                image's size).
            strength: how much of the image may change, in (0, 1]; the derived pipeline's default when None.
            mask_image: the inpainting mask (a path or a PIL image of the image's size; white is repainted).
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
            >>> pipe.generate("the same fox in ink", image=result.image, strength=0.6, seed=1)
            ```
        """
        args = GenerationArgs.checked(prompt, negative_prompt, steps, guidance, seed, width, height, num_images,
                                      image=image, strength=strength, mask_image=mask_image, **pipeline_kwargs)
        check_progress(progress)
        return self.run(args, progress)

    def run(self, args: GenerationArgs, progress: Callable[[int, int], None] | None = None, *,
            rescued_from: OptimizationLevel | None = None, notes: tuple[str, ...] = ()) -> GenerationResult:
        """Generate from arguments already checked (:meth:`GenerationArgs.checked`); see :meth:`generate`.

        Args:
            args: what to generate.
            progress: called as ``progress(step, total)`` after each denoising step.
            rescued_from: the level that ran out of memory first, when the OOM rescue runs this generation.
            notes: what the result says happened before it (the rescue's).
        """
        interrupted = GenerationInterrupted(
            f"interrupted while waiting for the generation of {self.model!r} in another thread; nothing was generated"
        )
        with self.hold("this generation", interrupted):  # a second caller (the dashboard's button) waits
            with self._own_generation():
                return self._generate(args, progress, rescued_from, notes)

    @contextlib.contextmanager
    def _own_generation(self):
        """Mark this thread as generating on the pipeline; an unload it asks for meanwhile (a step callback calling
        ``mlnb.unload_all()`` or ``%vram free``) runs when the generation ends, not under it."""
        outer, self._generating_in = self._generating_in, threading.get_ident()
        try:
            yield
        finally:
            self._generating_in = outer
            if outer is None and self._unload_when_done:
                self._unload_when_done = False
                self.unload()

    def _check_loaded(self) -> None:
        if self.pipe is None:
            why = f" {self.unloaded_why}" if self.unloaded_why else ""
            raise InvalidArgumentError(
                f"pipeline {self.model!r} was unloaded{why}; load it again with mlnb.load_pipeline"
            )

    def _generate(self, args: GenerationArgs, progress, rescued_from, notes) -> GenerationResult:
        entered = time.perf_counter()
        self._check_loaded()
        cache.touch(self)
        runner = pipeline_for(self.pipe, args.task)  # the loaded pipeline, or its img2img/inpaint twin
        width, height = output_size(args, self.default_size())
        num_images = args.num_images
        preflight(self.pipe, self.dtype, self.device, args.steps, args.guidance, width, height, num_images)
        seed = secrets.randbits(31) if args.seed is None else args.seed
        pipeline_kwargs = dict(args.pipeline_kwargs)
        user_callback = pipeline_kwargs.pop("callback_on_step_end", None)  # runs after mlnb's own
        text_to_image_parameters(self.pipe)
        accepted, kwargs, strength, steps = call_arguments(runner, args, seed, width, height)
        timer = StepTimer.on(self.device)
        loop: dict[int, dict[str, int]] = {}  # the allocator's counters after the first and the last step

        def after(step: int) -> None:
            if self.device.is_cuda and step in (0, steps - 1):
                loop[step] = self.device.allocator_counters()
            if progress is not None:
                progress(step + 1, steps)

        guard = FiniteGuard(self.model, pipeline_family(self.pipe), dtype_name(self.dtype), self.device, steps)
        if "callback_on_step_end" in accepted:
            kwargs["callback_on_step_end"] = timer.callback(after, then=guard.callback(then=user_callback))
        elif user_callback is not None:
            raise UnsupportedPipelineError(f"{type(self.pipe).__name__} takes no callback_on_step_end")
        kwargs.update(pipeline_kwargs)
        work = Workload(width, height, num_images, steps, vae_fp32=vae_needs_upcast(self.pipe))
        # Without a GPU the plan is not applied: nothing to predict, nothing to warn about.
        predicted_peak, predicted_seconds = (
            self._predict_warning_over_budget(work) if self.device.has_memory_counters else (None, None)
        )
        self._make_room(predicted_peak)
        guidance = args.guidance if args.guidance is not None else call_default(runner, "guidance_scale")
        loras = tuple(a.spec for a in active_loras(self.pipe))

        config = self.config
        context = self.learning_context()
        blocks = learning.block_timer(context, work)
        # No cache clear or full collection on the critical path: the deferred release gives the memory back once
        # the kernel is idle, unless another generation starts first. An error or an interrupt cleans up at once.
        monitor = MemoryMonitor(
            self.device, collect="if_needed" if config.gc_collect else False, empty_cache=config.cuda_cache_clear,
            defer=True,
        )
        with guard.watching(runner):
            images, start, seconds, cleaned = monitored_call(self.pipe, runner, kwargs, timer, blocks, monitor,
                                                             self.device, self.model)
        guard.check()  # NaN or inf in a step's latents or the decode: one line, the pipeline stays loaded
        allocator_in_steps = {}
        if loop.get(0) and steps > 1 and loop.get(steps - 1):
            allocator_in_steps = {k: v - loop[0][k] for k, v in loop[steps - 1].items()}
        learning.record(context, work, timer, monitor.report, cleaned - entered, blocks)
        learning.room_for_the_allocator(context, work, timer, allocator_in_steps)
        phase_seconds = dict(
            before=start - entered, pipeline=seconds, cleanup=cleaned - start - seconds,  # the monitor's exit
            after=time.perf_counter() - cleaned,
        )
        params = dict(
            prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance=guidance,
            width=width, height=height, num_images=num_images,
        )
        inputs = args.inputs
        result = GenerationResult(
            images=images, seed=seed, params=params, memory=monitor.report, seconds=seconds,
            level=self.level, techniques=self.techniques, model=self.model, setting=self.setting,
            rescued_from=rescued_from, notes=notes, plan=self.plan,
            predicted_peak=predicted_peak, predicted_seconds=predicted_seconds,
            step_seconds=timer.step_seconds, decode_seconds=timer.decode_seconds,
            first_step_seconds=timer.first_seconds, phase_seconds=phase_seconds,
            allocator_in_steps=allocator_in_steps, loras=loras,
            image_source=inputs.image_source if inputs is not None else None,
            mask_source=inputs.mask_source if inputs is not None else None, strength=strength,
        )
        cache.remember(result)
        return result

    def _make_room(self, predicted_peak: int | None) -> None:
        """Other models' weights out of the way of a plan's predicted peak, when the card is short of room for it;
        what this pipeline already holds there is part of that peak (walked only when short of room)."""
        needed = room_needed(predicted_peak) if predicted_peak is not None else 0
        free = self.device.free_bytes() if needed else None
        if free is None or free >= needed:
            return
        try:
            cache.make_room(needed - cache.gpu_bytes(self), self.device, self.model)
        except KeyboardInterrupt:
            raise GenerationInterrupted(
                f"interrupted while making room on the GPU; {self.model!r} stays loaded"
            ) from None

    def _predict_warning_over_budget(self, work: Workload) -> tuple[int | None, float | None]:
        """:meth:`predict`, with a warning when the size asked for needs more than the plan's budget."""
        peak, seconds = self.predict(work)
        if peak is not None and peak > self.plan.budget:
            logger.warning(
                "%d×%d ×%d is predicted to need %s, more than the %s plan (made for the native size); "
                "a smaller size, or a new plan for this size, fits", work.width, work.height, work.batch,
                format_bytes(peak), self.setting.show_budget(self.plan.budget),
            )
        return peak, seconds

    # -- unloading -------------------------------------------------------------------------------------------------

    def unload(self) -> None:
        """Drop the pipeline (hooks, weights, pinned copies) from the cache and clean up. A generation running on it
        in another thread (the dashboard's) finishes first; asked from inside its own generation (a step callback),
        the unload runs when that generation ends."""
        if self._generating_in == threading.get_ident():  # asked from inside its own generation
            if not self._unload_when_done:
                logger.warning("%s is generating in this thread: it is unloaded when the generation ends", self.model)
            self._unload_when_done = True
            return
        interrupted = UnloadInterrupted(
            f"interrupted while waiting for the generation of {self.model!r} in another thread; it stays loaded"
        )
        with self.hold("unloading it", interrupted):  # first: interrupted while waiting, it stays cached and loaded
            cache.forget(self)
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


def _model_key(pipe, dtype) -> str | None:
    """The step-timing cache key, or ``None`` for a pipeline without a UNet or transformer (nothing to time)."""
    if pipe is None:
        return None
    try:
        return model_key(pipe, dtype)
    except ValueError:
        return None
