"""Argument checks, made once where arguments enter, before any work: generation arguments (:class:`GenerationArgs`),
the keyword arguments ``load_pipeline`` passes to ``from_pretrained``, and what a pipeline's call must take; and the
preflight of a request against the pipeline that runs it (its scheduler's steps, its compute dtype's range, and the
activations of its size and batch against the memory of the device it runs on).

Each refusal is an :class:`~mlnb.errors.InvalidArgumentError` (or :class:`~mlnb.errors.UnsupportedPipelineError`)
whose one line names the argument and the rule it broke.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from ..errors import InvalidArgumentError, UnsupportedPipelineError
from ..planner.cost import Workload, decode_reserve, denoise_reserve
from ..units import format_bytes
from .images import ImageInputs, ImageTask, image_inputs

__all__ = [
    "GenerationArgs",
    "MAX_SIDE",
    "MAX_IMAGES",
    "check_progress",
    "check_steps_for_scheduler",
    "check_guidance_for_dtype",
    "activations_needed",
    "check_activations_fit",
    "check_load_keywords",
    "FROM_PRETRAINED_KEYWORDS",
    "LOAD_PIPELINE_KEYWORDS",
    "text_to_image_parameters",
]

MAX_SIDE = 4096  # pixels; larger requests are almost always typos
MAX_IMAGES = 16

# generate's own arguments, which the pipeline call gets from them: passed again as pipeline arguments they would run
# something other than what the result records (its steps, seed, size), or return tensors instead of images.
_MANAGED_KWARGS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "num_inference_steps": "steps", "generator": "seed",
    "guidance_scale": "guidance", "width": "width", "height": "height", "num_images_per_prompt": "num_images",
    "output_type": None, "return_dict": None,
}


@dataclass(frozen=True)
class GenerationArgs:
    """What to generate, checked: build it with :meth:`checked` (the magic's request, the dashboard's form and
    :meth:`~mlnb.ManagedPipeline.generate` do), and the layers below take it as it is.

    Attributes:
        prompt: the text prompt.
        negative_prompt: what to steer away from.
        steps: denoising steps.
        guidance: classifier-free guidance scale (the pipeline's default when None).
        seed: the seed (drawn at random and recorded when None).
        width, height: pixels, multiples of 8 (the model's native size when None).
        num_images: images per prompt.
        pipeline_kwargs: further arguments of the pipeline's call (a ``callback_on_step_end`` among them).
        inputs: the start image, mask and strength of an image-to-image or inpainting generation, opened and
            checked; None for text-to-image.
    """

    prompt: str
    negative_prompt: str | None = None
    steps: int = 30
    guidance: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)
    inputs: ImageInputs | None = None

    @property
    def task(self) -> ImageTask:
        """Text-to-image, image-to-image or inpainting."""
        return self.inputs.task if self.inputs is not None else ImageTask.TEXT_TO_IMAGE

    @classmethod
    def checked(
        cls,
        prompt,
        negative_prompt: str | None = None,
        steps: int = 30,
        guidance: float | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        spell: Callable[[str], str] = str,
        image=None,
        strength: float | None = None,
        mask_image=None,
        **pipeline_kwargs,
    ) -> GenerationArgs:
        """Check generation arguments and keep them as the types they are (numpy integers become ints).

        Args:
            prompt, negative_prompt, steps, guidance, seed, width, height, num_images: see the attributes.
            image: the start image of an image-to-image or inpainting generation (a path or a PIL image).
            strength: how much of the image may change, in (0, 1] (the derived pipeline's default when None).
            mask_image: the inpainting mask (a path or a PIL image, the image's size; white is repainted).
            spell: the name a message uses for an argument (``"num_images"`` -> ``"--num-images"`` for the magic).
            **pipeline_kwargs: passed on to the pipeline's call, except what generate sets itself
                (``num_inference_steps``, ``generator``, ``guidance_scale``, ``output_type``...), which is refused with
                the argument to use.

        Raises:
            InvalidArgumentError: naming the argument and its rule.

        Example:
            ```python
            >>> GenerationArgs.checked("a fox", steps=20, width=512, height=512).steps
            20
            ```
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
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise InvalidArgumentError(
                f"{spell('negative_prompt')} must be a string, got {type(negative_prompt).__name__}"
            )
        _check_pipeline_kwargs(pipeline_kwargs)
        inputs = image_inputs(image, strength, mask_image, spell=spell)
        if inputs is not None:
            _check_image_task(inputs, int(steps), width, height, spell)
        return cls(
            prompt=prompt, negative_prompt=negative_prompt, steps=int(steps),
            guidance=None if guidance is None else float(guidance), seed=None if seed is None else int(seed),
            width=None if width is None else int(width), height=None if height is None else int(height),
            num_images=int(num_images), pipeline_kwargs=dict(pipeline_kwargs), inputs=inputs,
        )


def _check_image_task(inputs: ImageInputs, steps: int, width, height, spell: Callable[[str], str]) -> None:
    """Refuse a size for image-to-image (its output is the image's size) and a strength that leaves no step."""
    if inputs.task is ImageTask.IMAGE_TO_IMAGE and (width is not None or height is not None):
        given = spell("width") if width is not None else spell("height")
        w, h = inputs.image.size
        raise InvalidArgumentError(
            f"{given}: image-to-image makes an image of the start image's size ({w}×{h}); resize the image, or "
            "give a mask to inpaint at another size"
        )
    if inputs.strength is not None and int(steps * inputs.strength) < 1:
        raise InvalidArgumentError(
            f"{spell('strength')} {inputs.strength:g} of {steps} {spell('steps')} runs no denoising step "
            f"(strength × steps < 1): raise one of them"
        )


def _whole(value) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_pipeline_kwargs(pipeline_kwargs: Mapping[str, Any]) -> None:
    """Refuse the pipeline arguments generate sets itself, and a ``callback_on_step_end`` that is not a function."""
    for name in sorted(set(pipeline_kwargs) & set(_MANAGED_KWARGS)):
        own = _MANAGED_KWARGS[name]
        raise InvalidArgumentError(
            f"{name} is set by generate: pass {own}= instead" if own else
            f"{name} is set by generate (PIL images, which the result shows and saves)"
        )
    callback = pipeline_kwargs.get("callback_on_step_end")
    if callback is not None and not callable(callback):
        raise InvalidArgumentError("callback_on_step_end must be a function")


def check_progress(progress) -> None:
    """Refuse a ``progress`` that is not a function of ``(step, total)`` (None is none)."""
    if progress is not None and not callable(progress):
        raise InvalidArgumentError(f"progress must be a function of (step, total), got {type(progress).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# The preflight: what the pipeline that runs a request can take


def check_steps_for_scheduler(steps: int, train_steps: int | None, scheduler: str) -> None:
    """Refuse more denoising steps than the scheduler has training timesteps (it would index past its table at the
    end of the run, or build a table too large to hold). ``train_steps`` None: the scheduler names no bound."""
    if train_steps is not None and steps > train_steps:
        raise InvalidArgumentError(
            f"steps must be at most {train_steps}: the scheduler ({scheduler}) has {train_steps} training steps, "
            f"got {steps}"
        )


def check_guidance_for_dtype(guidance: float | None, largest: float, dtype: str) -> None:
    """Refuse a guidance scale that is infinite in the pipeline's compute dtype (``largest`` is its largest finite
    value): the noise prediction it scales would be inf, and the image black."""
    if guidance is not None and guidance > largest:
        raise InvalidArgumentError(
            f"guidance must be at most {largest:.4g}, the largest {dtype} number (the pipeline computes in {dtype}), "
            f"got {guidance!r}"
        )


def activations_needed(width: int, height: int, batch: int, on_gpu: bool, itemsize: int = 2,
                       vae_fp32: bool = False, decode_tile: int | None = None, decode_batch: int | None = None) -> int:
    """Bytes a generation needs beyond its weights, from the planner's reserves (:mod:`mlnb.planner.cost`).

    On a GPU: one denoising step's activations, which no level reduces (an offloaded or tiled decode fits beside
    them, and the OOM rescue tiles it). On a CPU, where nothing is offloaded or rescued: the larger of one denoising
    step's and the VAE decode's, the decode as the VAE will run it (its tiles, one image at a time when sliced).

    Args:
        width, height, batch: the request's size and images per prompt.
        on_gpu: the device is a GPU (the decode does not count, see above).
        itemsize: bytes per element of the compute dtype (the reserves are for fp16: fp32 doubles them).
        vae_fp32: the VAE decodes in fp32.
        decode_tile: the VAE's tile in pixels when it tiles.
        decode_batch: the images one decode holds at once (1 when the VAE slices); ``batch`` when None.
    """
    work = Workload(width, height, batch, steps=1, vae_fp32=vae_fp32)
    denoise = denoise_reserve(work) * itemsize // 2
    if on_gpu:
        return denoise
    decode = decode_reserve(Workload(width, height, decode_batch or batch, steps=1, vae_fp32=vae_fp32), decode_tile)
    return max(denoise, decode)


def check_activations_fit(width: int, height: int, batch: int, room: int | None, needed: Callable[[int, int, int], int],
                          where: str) -> None:
    """Refuse a size and batch whose activations need more than ``room`` bytes, naming the largest batch at this
    size and the largest size (same shape) at this batch that fit.

    Args:
        width, height, batch: the request.
        room: the bytes there are for them (None: unknown, nothing is refused).
        needed: ``needed(width, height, batch)``, the bytes a request needs (:func:`activations_needed`).
        where: what ``room`` is, as the message says it (``"of host RAM, 12 GiB available"``).
    """
    need = needed(width, height, batch)
    if room is None or need <= room:
        return
    fits = []
    most = max((b for b in range(1, batch) if needed(width, height, b) <= room), default=0)
    if most:
        fits.append(f"{most} image{'s' if most > 1 else ''} at {width}×{height}")
    for side in range(width - 8, 7, -8):  # the width, and the height in proportion, in steps of 8 px
        h = max(8, round(height * side / width / 8) * 8)
        if needed(side, h, batch) <= room:
            fits.append(f"{side}×{h} with {batch} image{'s' if batch > 1 else ''}")
            break
    what = (f"the largest that fits: {', or '.join(fits)}" if fits
            else "not even 8×8 fits: free memory first (%vram free)")
    raise InvalidArgumentError(
        f"{width}×{height} ×{batch} needs about {format_bytes(need)} {where}; {what}"
    )


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


# ----------------------------------------------------------------------------------------------------------------
# load_pipeline's keyword arguments

LOAD_PIPELINE_KEYWORDS = frozenset({"model", "level", "dtype", "allow_pickle", "device", "config", "budget", "loras"})

# DiffusionPipeline.from_pretrained's own keyword arguments, diffusers 0.39 to 0.42: what it reads from **kwargs and
# what its docstring lists (the dtype it gets from load_pipeline's own `dtype`). Anything else it passes to the
# pipeline class, which takes its components (`scheduler=`) and its optional settings, and ignores the rest.
FROM_PRETRAINED_KEYWORDS = frozenset({
    "cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "custom_pipeline",
    "custom_revision", "mirror", "device_map", "max_memory", "offload_folder", "offload_state_dict",
    "low_cpu_mem_usage", "use_safetensors", "use_onnx", "variant", "dduf_file", "quantization_config", "torch_dtype",
    "trust_remote_code", "load_connected_pipeline", "provider", "provider_options", "sess_options", "disable_mmap",
    "use_flashpack", "from_flax",
})


def check_load_keywords(names: Iterable[str], pipeline_parameters: Iterable[str] | None) -> frozenset[str]:
    """Refuse a keyword argument of ``load_pipeline`` that neither it nor ``from_pretrained`` takes.

    Args:
        names: the keyword arguments ``load_pipeline`` did not take itself.
        pipeline_parameters: what the model's pipeline class takes (its components and settings); None while the
            class is not known yet (a hub model not in the local cache): the names only it could take are returned,
            to be checked once it is.

    Returns:
        The names left to check against the pipeline class (empty when ``pipeline_parameters`` was given).

    Raises:
        InvalidArgumentError: one line naming the keyword and the close matches.
    """
    own = LOAD_PIPELINE_KEYWORDS | FROM_PRETRAINED_KEYWORDS
    unknown = sorted(set(names) - own - set(pipeline_parameters or ()))
    if not unknown:
        return frozenset()
    if pipeline_parameters is None:
        return frozenset(unknown)
    name = unknown[0]
    known = sorted(own | set(pipeline_parameters))
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise InvalidArgumentError(
        f"load_pipeline got an unknown keyword argument {name}=: neither load_pipeline nor "
        f"DiffusionPipeline.from_pretrained takes it, nor the pipeline as a component{hint}"
    )
