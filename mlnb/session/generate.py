"""The one generation use case, which ``%%generate`` and the dashboard's Generate button both call.

It takes what the UI parsed (checked generation arguments, and a model and a memory setting when the user named
them), resolves the session's defaults for the rest, loads the pipeline (cached), remembers the model for the next
generation, and generates with the OOM rescue. The UI then only displays the result.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from ..errors import InvalidArgumentError
from ..pipeline import loading, rescue
from ..pipeline.loras import LoraSpec
from ..pipeline.managed import ManagedPipeline
from ..pipeline.result import GenerationResult
from ..pipeline.validation import GenerationArgs
from ..setting import MemorySetting
from .defaults import default_model, defaults

__all__ = ["NO_MODEL", "resolve", "generate_images"]

NO_MODEL = (
    "no model: name one with %%generate --model ID_OR_FOLDER or in the dashboard's model field (it is remembered "
    "for later cells), or set MLNB_MODEL"
)


def resolve(model: str | os.PathLike | None = None,
            setting: MemorySetting | None = None) -> tuple[str, MemorySetting]:
    """The model and the memory setting a generation uses: those given, else the session's (the last model or
    ``$MLNB_MODEL``; ``%vram level``'s setting).

    Raises:
        InvalidArgumentError: no model given and none remembered, saying how to name one.
    """
    model = model or default_model()
    if not model:
        raise InvalidArgumentError(NO_MODEL)
    return os.fspath(model), setting if setting is not None else defaults.setting


def generate_images(
    args: GenerationArgs,
    model: str | os.PathLike | None = None,
    setting: MemorySetting | None = None,
    allow_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
    loaded: Callable[[ManagedPipeline], None] | None = None,
    loras: Sequence[LoraSpec] | None = None,
) -> GenerationResult:
    """Generate as ``%%generate`` and the dashboard do: the session's model and memory setting where none is given,
    the pipeline loaded (or found in the cache) for them, the model remembered, and the OOM rescue around the
    generation.

    Args:
        args: what to generate, checked where it was typed.
        model: a hub id or a local folder; the session's when None.
        setting: the memory setting; the session's (``%vram level``) when None.
        allow_pickle: accept pickle weights, of the model and of its LoRAs (can run code: only for trusted files).
        progress: called as ``progress(step, total)`` after each denoising step.
        loaded: called with the pipeline once it is loaded, before the generation starts (a UI says which level
            or plan it runs with, and opens its progress bar).
        loras: the LoRAs to generate with (the pipeline's set becomes exactly these; empty: none); None leaves the
            pipeline's set as it is (the dashboard generates with the LoRAs the last cell set).

    Returns:
        The :class:`~mlnb.GenerationResult`, also what :func:`mlnb.last_result` returns.

    Raises:
        InvalidArgumentError: no model to use, or a setting the model cannot be loaded with.
        MlnbError: the one-line load and generation errors (a missing model, out of memory at ultra...).

    Example:
        ```python
        >>> from mlnb.pipeline import GenerationArgs
        >>> from mlnb.session import generate_images
        >>> result = generate_images(GenerationArgs.checked("a watercolor fox", steps=20), model="org/name")
        ```
    """
    model, setting = resolve(model, setting)
    managed = loading.load(model, setting, allow_pickle=allow_pickle)
    defaults.model = model
    if loras is not None:  # a bad LoRA is one line, and the pipeline stays loaded with the set it had
        managed.set_loras(loras, allow_pickle=allow_pickle)
    if loaded is not None:
        loaded(managed)
    return rescue.generate_with_rescue(managed, args, progress)
