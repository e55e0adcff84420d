"""The diffusers call of one generation: its arguments from the checked :class:`GenerationArgs`, for the loaded
pipeline (text to image) or its image-to-image / inpainting twin, and the steps that call really runs."""

from __future__ import annotations

import inspect

from ..errors import InvalidArgumentError, UnsupportedPipelineError
from .validation import GenerationArgs

__all__ = ["call_arguments", "output_size", "call_default", "denoising_steps"]


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
