"""Image inputs for image-to-image and inpainting, and the pipeline for either made from the loaded components.

An image or a mask is a path (``str`` or ``os.PathLike``) or a PIL image; the magic layer resolves a notebook
variable's name to its value before it gets here. Each is opened and checked before any work, one line for each
refusal: a file that is not there or does not open as an image, an image with no pixels, a mask whose size is not
the image's, a strength that is not a finite number in (0, 1]. Images are converted to RGB and masks to one channel
(``L``: white is repainted, black kept).

The image-to-image and inpainting pipelines come from the loaded text-to-image pipeline through diffusers'
``AutoPipelineForImage2Image.from_pipe`` / ``AutoPipelineForInpainting.from_pipe``: the same component objects, so no
weight is read or copied, and what is installed on the components (offload hooks, fp8 storage, LoRA adapters) is
shared with it. (The ``from_pipe`` of a pipeline class casts the new pipeline to a dtype, fp32 unless told, which
copies weights; the auto pipelines' does not.) What the derived pipelines do differently:

- the image-to-image calls take no ``height``/``width``: the image's size is the output's (rounded down to a
  multiple of the VAE's 8); the inpainting calls take them and default to the image's;
- their default strength is their own (SD 0.8 for image-to-image and 1 for inpainting, SDXL 0.3 and 0.9999);
- under model CPU offload a derived pipeline has no list of the hooks (``_all_hooks`` is the loaded pipeline's), so
  its call ends without offloading the last component it ran; the loaded pipeline's ``maybe_free_model_hooks()``
  does.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..errors import InvalidArgumentError

__all__ = ["ImageTask", "ImageInputs", "load_image", "check_strength", "image_inputs", "pipeline_for"]


class ImageTask(str, Enum):
    """What a generation starts from: a prompt alone, an image, or an image and a mask."""

    TEXT_TO_IMAGE = "text2img"
    IMAGE_TO_IMAGE = "img2img"
    INPAINT = "inpaint"


def _source(value) -> str:
    """An image input as given, for the record: its path, or what the PIL image is."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    size = getattr(value, "size", None)
    return f"a {size[0]}×{size[1]} PIL image" if isinstance(size, tuple) and len(size) == 2 else type(value).__name__


def load_image(value, name: str = "image", mode: str = "RGB"):
    """Open and check one image input.

    Args:
        value: a path (``str`` or ``os.PathLike``) or a PIL image.
        name: the argument's name, for the messages (``image``, ``mask_image``).
        mode: the PIL mode it is converted to (``"RGB"`` for an image, ``"L"`` for a mask).

    Returns:
        A PIL image in ``mode``, its pixels loaded (a file is closed again).

    Raises:
        InvalidArgumentError: no such file, a file that does not open as an image, a value that is neither a path
            nor a PIL image, or an image with no pixels.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, (str, os.PathLike)):
        path = Path(os.fspath(value)).expanduser()
        if not path.is_file():
            raise InvalidArgumentError(f"{name}: no image file at {os.fspath(value)!r}")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.convert(mode) if opened.mode != mode else opened.copy()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            lines = str(exc).strip().splitlines()
            raise InvalidArgumentError(
                f"{name}: {os.fspath(value)!r} does not open as an image ({lines[0] if lines else type(exc).__name__})"
            ) from None
    elif isinstance(value, Image.Image):
        image = value
    else:
        raise InvalidArgumentError(f"{name} must be a path or a PIL image, got {type(value).__name__}")
    width, height = image.size
    if width == 0 or height == 0:
        shown = repr(os.fspath(value)) if isinstance(value, (str, os.PathLike)) else "the PIL image"
        raise InvalidArgumentError(f"{name}: {shown} has no pixels ({width}×{height})")
    return image.convert(mode) if image.mode != mode else image


def check_strength(strength, name: str = "strength") -> float:
    """``strength`` as a float in (0, 1]: how much of the image the generation may change (1: all of it).

    Args:
        strength: the value given.
        name: the argument's name, for the messages.

    Raises:
        InvalidArgumentError: a value that is not a finite number in (0, 1].
    """
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise InvalidArgumentError(f"{name} must be a number in (0, 1], got {strength!r}")
    value = float(strength)
    if not math.isfinite(value) or not 0 < value <= 1:
        raise InvalidArgumentError(f"{name} must be a finite number in (0, 1], got {strength!r}")
    return value


@dataclass(frozen=True)
class ImageInputs:
    """The checked image inputs of one generation.

    Args:
        image: the start image (RGB).
        mask: the inpainting mask (``L``, the image's size), or None for image-to-image.
        strength: how much may change, in (0, 1]; None for the derived pipeline's own default.
        image_source: the image as given (a path, or the PIL image's size), for the record.
        mask_source: the mask as given, or None.
    """

    image: object
    mask: object | None = None
    strength: float | None = None
    image_source: str = ""
    mask_source: str | None = None

    @property
    def task(self) -> ImageTask:
        return ImageTask.INPAINT if self.mask is not None else ImageTask.IMAGE_TO_IMAGE

    def call_kwargs(self) -> dict:
        """The keyword arguments of the derived pipeline's call: ``image``, and ``mask_image`` and ``strength``
        when given."""
        kwargs: dict = {"image": self.image}
        if self.mask is not None:
            kwargs["mask_image"] = self.mask
        if self.strength is not None:
            kwargs["strength"] = self.strength
        return kwargs


def image_inputs(image=None, strength=None, mask_image=None, spell=str) -> ImageInputs | None:
    """Check a generation's image arguments together; None for a text-to-image call (no image, mask or strength).

    Args:
        image: the start image (a path or a PIL image).
        strength: in (0, 1], or None for the pipeline's default.
        mask_image: the inpainting mask (a path or a PIL image), the image's size.
        spell: the name a message uses for an argument (``"mask_image"`` -> ``"--mask"`` for the magic).

    Raises:
        InvalidArgumentError: a bad image, mask or strength (see :func:`load_image`, :func:`check_strength`), a
            mask or a strength without an image, or a mask whose size is not the image's.

    Example:
        ```python
        >>> inputs = image_inputs("fox.png", strength=0.6)
        >>> pipeline_for(pipe, inputs.task)("a fox in ink", **inputs.call_kwargs())
        ```
    """
    if image is None:
        if mask_image is not None or strength is not None:
            given = spell("mask_image") if mask_image is not None else spell("strength")
            raise InvalidArgumentError(f"{given} needs an image to start from: give {spell('image')} too")
        return None
    picture = load_image(image, spell("image"))
    value = check_strength(strength, spell("strength")) if strength is not None else None
    mask = None
    if mask_image is not None:
        mask = load_image(mask_image, spell("mask_image"), mode="L")
        if mask.size != picture.size:
            raise InvalidArgumentError(
                f"{spell('mask_image')} is {mask.size[0]}×{mask.size[1]} but the image is "
                f"{picture.size[0]}×{picture.size[1]}: give a mask of the image's size"
            )
    return ImageInputs(picture, mask, value, _source(image), _source(mask_image) if mask_image is not None else None)


def pipeline_for(pipe, task: ImageTask | str):
    """The pipeline that runs ``task`` with ``pipe``'s components (the same objects: no weight is copied).

    Args:
        pipe: a loaded text-to-image diffusers pipeline.
        task: ``"text2img"`` (``pipe`` itself), ``"img2img"`` or ``"inpaint"``.

    Raises:
        InvalidArgumentError: diffusers has no pipeline for ``task`` made from ``pipe``'s class.
    """
    task = ImageTask(task)
    if task is ImageTask.TEXT_TO_IMAGE:
        return pipe
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    auto = AutoPipelineForInpainting if task is ImageTask.INPAINT else AutoPipelineForImage2Image
    try:
        derived = auto.from_pipe(pipe)
    except ValueError as exc:
        lines = str(exc).strip().splitlines()
        raise InvalidArgumentError(
            f"{type(pipe).__name__} has no {task.value} pipeline in diffusers ({lines[0] if lines else ''})"
        ) from None
    config = getattr(pipe, "_progress_bar_config", None)
    if config is not None:
        derived.set_progress_bar_config(**config)
    return derived
