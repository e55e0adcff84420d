"""The diffusers call of one generation: refused before any work when the pipeline cannot run it (the preflight),
its arguments from the checked :class:`GenerationArgs` for the loaded pipeline (text to image) or its image-to-image
/ inpainting twin, the steps it really runs, and the call itself inside the memory monitor."""

from __future__ import annotations

import inspect
import logging
import time

from ..device import Device
from ..errors import GenerationInterrupted, InvalidArgumentError, UnsupportedPipelineError
from ..monitor import MemoryMonitor, frames_pinning, release_exception_frames
from ..optimizer.offload import vae_needs_upcast
from ..planner import streamers_of
from ..units import format_bytes
from .files import dtype_name
from .validation import (
    GenerationArgs, activations_needed, check_activations_fit, check_guidance_for_dtype, check_steps_for_scheduler,
)

logger = logging.getLogger(__name__)

__all__ = ["preflight", "call_arguments", "output_size", "call_default", "denoising_steps", "monitored_call"]


def output_size(args: GenerationArgs, native: tuple[int, int]) -> tuple[int, int]:
    """The output's size: the one given, else the start image's (rounded down to a multiple of the VAE's 8), else
    the model's ``native`` size."""
    if args.inputs is not None:
        w, h = args.inputs.image.size
        default_w, default_h = max(8, w // 8 * 8), max(8, h // 8 * 8)
    else:
        default_w, default_h = native
    return (default_w if args.width is None else args.width, default_h if args.height is None else args.height)


def call_default(pipe, name: str):
    """The default of ``pipe``'s call argument ``name``, or None."""
    parameter = inspect.signature(pipe.__call__).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


def denoising_steps(steps: int, strength: float | None) -> int:
    """The denoising steps a call runs: all of them from text, ``int(steps × strength)`` from an image (as
    diffusers' image-to-image and inpainting pipelines count them)."""
    return steps if strength is None else max(1, min(steps, int(steps * strength)))


def call_arguments(runner, args: GenerationArgs, seed: int, width: int, height: int) -> tuple[
        set[str], dict, float | None, int]:
    """The arguments of ``runner``'s call (PIL output, a CPU generator seeded with ``seed``, the image inputs):
    ``(the names the call takes, the arguments, the strength it runs at or None, the denoising steps it runs)``.

    Raises:
        UnsupportedPipelineError: several images asked of a pipeline that makes one per call.
        InvalidArgumentError: the pipeline's own default strength runs no denoising step at these steps.
    """
    import torch

    accepted = set(inspect.signature(runner.__call__).parameters)
    kwargs = {
        "prompt": args.prompt, "num_inference_steps": args.steps, "width": width, "height": height,
        "generator": torch.Generator(device="cpu").manual_seed(seed), "output_type": "pil",
    }
    if args.negative_prompt:
        kwargs["negative_prompt"] = args.negative_prompt
    if args.guidance is not None and "guidance_scale" in accepted:
        kwargs["guidance_scale"] = float(args.guidance)
    if "num_images_per_prompt" in accepted:
        kwargs["num_images_per_prompt"] = args.num_images
    elif args.num_images != 1:
        raise UnsupportedPipelineError(f"{type(runner).__name__} makes one image per call")
    strength = None
    if args.inputs is not None:
        kwargs.update(args.inputs.call_kwargs())
        strength = args.inputs.strength if args.inputs.strength is not None else call_default(runner, "strength")
        if "width" not in accepted:  # image-to-image: the image's size
            del kwargs["width"], kwargs["height"]
        if int(args.steps * strength) < 1:  # the pipeline's own default strength (a given one is checked)
            raise InvalidArgumentError(
                f"{type(runner).__name__}'s default strength {strength:g} of {args.steps} steps runs no "
                "denoising step: give more steps or a strength"
            )
    return accepted, kwargs, strength, denoising_steps(args.steps, strength)


def preflight(pipe, dtype, device: Device, steps: int, guidance: float | None, width: int, height: int,
              num_images: int) -> None:
    """Refuse, before any work, what ``pipe`` cannot run: more steps than its scheduler has, a guidance
    infinite in its compute dtype, or a size and batch whose activations exceed the memory of its device (the
    card's whole memory on a GPU, the host RAM available now on a CPU)."""
    import torch

    scheduler = pipe.scheduler
    train_steps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    check_steps_for_scheduler(steps, train_steps, type(scheduler).__name__)
    check_guidance_for_dtype(guidance, torch.finfo(dtype).max, dtype_name(dtype))
    on_gpu = device.has_memory_counters
    vae = getattr(pipe, "vae", None)
    tile = getattr(vae, "tile_sample_min_size", None) if getattr(vae, "use_tiling", False) else None
    one_at_a_time = 1 if getattr(vae, "use_slicing", False) else None
    vae_fp32 = dtype.itemsize >= 4 or vae_needs_upcast(pipe)
    if on_gpu:
        name, room = device.describe()
        where = f"of GPU memory for one denoising step, and the {name} has {format_bytes(room)} in all"
    else:
        from ..device import host_memory

        room = host_memory()[1]
        where = f"of host RAM for one denoising step or the decode, and {format_bytes(room)} is available"
    check_activations_fit(
        width, height, num_images, room,
        lambda w, h, b: activations_needed(w, h, b, on_gpu, dtype.itemsize, vae_fp32, tile, one_at_a_time),
        where,
    )


def monitored_call(pipe, runner, kwargs: dict, timer, blocks, monitor: MemoryMonitor, device: Device,
               model: str) -> tuple[list, float, float, float]:
    """``runner``'s call inside ``monitor`` (``runner`` is ``pipe`` or its image-to-image twin): (images, when the
    call started, its seconds, when the monitor closed: its cleanup after an error, the deferred release's request
    otherwise). Streamed blocks go home whatever happens; an interrupt is a one-line error. A derived
    pipeline (image-to-image, inpainting) has no list of model offload's hooks: the loaded pipeline's
    ``maybe_free_model_hooks`` offloads the last component it ran."""
    try:
        with monitor:
            start = time.perf_counter()
            try:
                timer.begin()
                with blocks:
                    output = runner(**kwargs)
                images = list(output.images)
                del output
                if runner is not pipe and hasattr(pipe, "maybe_free_model_hooks"):
                    pipe.maybe_free_model_hooks()
                timer.finish()
                for streamer in streamers_of(pipe):  # slots kept across the steps (a decode drops them)
                    streamer.release()
            except BaseException as exc:
                # The frames that pin memory the cache does not keep (latents, a failing layer's workspace) let
                # it go; the others (a user's step callback) keep their locals for %debug.
                release_exception_frames(exc, frames_pinning(device, spare=(pipe,)))
                for streamer in streamers_of(pipe):  # a prefetched block would stay on the GPU
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
            f"{model!r} stays loaded"
        ) from None
