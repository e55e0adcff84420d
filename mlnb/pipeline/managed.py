"""``ManagedPipeline``: a loaded diffusers pipeline with its memory setting applied, which generates inside a
:class:`~mlnb.MemoryMonitor`, cleans up whatever happens, and returns a :class:`~mlnb.GenerationResult`."""

from __future__ import annotations

import contextlib
import inspect
import logging
import secrets
import threading
import time
from typing import Callable

from ..device import Device
from ..errors import GenerationInterrupted, InvalidArgumentError, UnloadInterrupted, UnsupportedPipelineError
from ..levels import LevelChoice, MemoryOptimizationConfig, OptimizationLevel
from ..monitor import MemoryMonitor, cleanup, release_exception_frames
from ..optimizer import OptimizationReport
from ..optimizer.offload import vae_needs_upcast
from ..optimizer.vae import vae_decode_dtype
from ..optimizer.weights import weight_bytes
from ..planner import (
    LearningContext, ModelFacts, Plan, StepTimer, Workload, learning, model_key, room_needed, streamers_of,
)
from ..setting import MemorySetting
from ..units import format_bytes
from . import cache
from .files import dtype_name
from .result import GenerationResult
from .validation import (
    GenerationArgs, activations_needed, check_activations_fit, check_guidance_for_dtype, check_progress,
    check_steps_for_scheduler, text_to_image_parameters,
)

logger = logging.getLogger(__name__)

__all__ = ["ManagedPipeline", "native_size"]


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
        self.plan_facts = plan_facts  # the weight bytes the plan was made from (before fp8 storage)
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
        args = GenerationArgs.checked(prompt, negative_prompt, steps, guidance, seed, width, height, num_images,
                                      **pipeline_kwargs)
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

    def _generate(self, args: GenerationArgs, progress, rescued_from, notes) -> GenerationResult:
        entered = time.perf_counter()
        if self.pipe is None:
            why = f" {self.unloaded_why}" if self.unloaded_why else ""
            raise InvalidArgumentError(
                f"pipeline {self.model!r} was unloaded{why}; load it again with mlnb.load_pipeline"
            )
        cache.touch(self)
        default_w, default_h = self.default_size()
        width = default_w if args.width is None else args.width
        height = default_h if args.height is None else args.height
        steps, num_images = args.steps, args.num_images
        self._preflight(steps, args.guidance, width, height, num_images)
        seed = secrets.randbits(31) if args.seed is None else args.seed
        pipeline_kwargs = dict(args.pipeline_kwargs)
        user_callback = pipeline_kwargs.pop("callback_on_step_end", None)  # runs after mlnb's own
        accepted = text_to_image_parameters(self.pipe)
        kwargs = self._call_kwargs(accepted, args.prompt, args.negative_prompt, steps, args.guidance, seed, width,
                                   height, num_images)
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
        predicted_peak, predicted_seconds = self._predict_warning_over_budget(work)
        self._make_room(predicted_peak)
        guidance = args.guidance
        if guidance is None:
            sig = inspect.signature(self.pipe.__call__).parameters.get("guidance_scale")
            guidance = sig.default if sig is not None and sig.default is not inspect.Parameter.empty else None

        config = self.config
        context = self.learning_context()
        blocks = learning.block_timer(context, work)
        # A full gc.collect only when the cache clear left GPU memory held (a cycle); errors always collect.
        monitor = MemoryMonitor(
            self.device, collect="if_needed" if config.gc_collect else False, empty_cache=config.cuda_cache_clear
        )
        images, start, seconds, cleaned = self._call(kwargs, timer, blocks, monitor)
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
            prompt=args.prompt, negative_prompt=args.negative_prompt, steps=steps, guidance=guidance,
            width=width, height=height, num_images=num_images,
        )
        result = GenerationResult(
            images=images, seed=seed, params=params, memory=monitor.report, seconds=seconds,
            level=self.level, techniques=self.techniques, model=self.model, setting=self.setting,
            rescued_from=rescued_from, notes=notes, plan=self.plan,
            predicted_peak=predicted_peak, predicted_seconds=predicted_seconds,
            step_seconds=timer.step_seconds, decode_seconds=timer.decode_seconds,
            first_step_seconds=timer.first_seconds, phase_seconds=phase_seconds,
            allocator_in_steps=allocator_in_steps,
        )
        cache.remember(result)
        return result

    def _preflight(self, steps: int, guidance: float | None, width: int, height: int, num_images: int) -> None:
        """Refuse, before any work, what this pipeline cannot run: more steps than its scheduler has, a guidance
        infinite in its compute dtype, or a size and batch whose activations exceed the memory of its device (the
        card's whole memory on a GPU, the host RAM available now on a CPU)."""
        import torch

        scheduler = self.pipe.scheduler
        train_steps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
        check_steps_for_scheduler(steps, train_steps, type(scheduler).__name__)
        check_guidance_for_dtype(guidance, torch.finfo(self.dtype).max, dtype_name(self.dtype))
        on_gpu = self.device.has_memory_counters
        vae = getattr(self.pipe, "vae", None)
        tile = getattr(vae, "tile_sample_min_size", None) if getattr(vae, "use_tiling", False) else None
        one_at_a_time = 1 if getattr(vae, "use_slicing", False) else None
        vae_fp32 = self.dtype.itemsize >= 4 or vae_needs_upcast(self.pipe)
        if on_gpu:
            name, room = self.device.describe()
            where = f"of GPU memory for one denoising step, and the {name} has {format_bytes(room)} in all"
        else:
            from ..device import host_memory

            room = host_memory()[1]
            where = f"of host RAM for one denoising step or the decode, and {format_bytes(room)} is available"
        check_activations_fit(
            width, height, num_images, room,
            lambda w, h, b: activations_needed(w, h, b, on_gpu, self.dtype.itemsize, vae_fp32, tile, one_at_a_time),
            where,
        )

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

    def _call(self, kwargs: dict, timer: StepTimer, blocks, monitor: MemoryMonitor) -> tuple[list, float, float, float]:
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
                    release_exception_frames(exc)
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


def native_size(pipe) -> tuple[int, int]:
    """A pipeline's native resolution: the denoiser's ``sample_size`` times the VAE scale factor."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    size = getattr(getattr(denoiser, "config", None), "sample_size", 64) or 64
    if isinstance(size, (list, tuple)):
        size = size[0]
    scale = getattr(pipe, "vae_scale_factor", 8)
    return int(size) * scale, int(size) * scale


def _model_key(pipe, dtype) -> str | None:
    """The step-timing cache key, or ``None`` for a pipeline without a UNet or transformer (nothing to time)."""
    if pipe is None:
        return None
    try:
        return model_key(pipe, dtype)
    except ValueError:
        return None
