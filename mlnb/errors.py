"""mlnb's error types. Each carries one line a person can act on; the UI shows it without a traceback."""

from __future__ import annotations

__all__ = [
    "MlnbError",
    "InvalidArgumentError",
    "ModelNotFoundError",
    "UnsafeWeightsError",
    "ModelLoadError",
    "OfflineError",
    "UnsupportedPipelineError",
    "OutOfMemoryRescueError",
    "NonFiniteOutputError",
    "GenerationInterrupted",
    "LoadInterrupted",
    "UnloadInterrupted",
]


class MlnbError(Exception):
    """Base class: ``str(exc)`` is a complete one-line message."""


class InvalidArgumentError(MlnbError, ValueError):
    """A generation or load argument breaks a rule; the message names the argument and the rule."""


class ModelNotFoundError(MlnbError, FileNotFoundError):
    """The model path does not exist or is not a diffusers pipeline folder."""


class UnsafeWeightsError(MlnbError):
    """The model has only pickle weights and ``allow_pickle`` was not given."""


class ModelLoadError(MlnbError):
    """The model exists but could not be loaded (corrupt file, wrong format)."""


class OfflineError(MlnbError):
    """A hub id was given but the hub cannot be reached."""


class UnsupportedPipelineError(MlnbError):
    """The pipeline's ``__call__`` does not take text-to-image arguments."""


class OutOfMemoryRescueError(MlnbError):
    """Out of GPU memory even at the strongest level; the message says what would fit."""


class NonFiniteOutputError(MlnbError):
    """A generation's latents or decoded image held NaN or inf (fp16 overflow, most often); the message names the
    model, the dtype, where it happened and what to load instead. The pipeline stays loaded."""


class GenerationInterrupted(MlnbError):
    """The generation was interrupted (KeyboardInterrupt); memory was freed and the pipeline kept."""


class LoadInterrupted(MlnbError):
    """Loading was interrupted (KeyboardInterrupt); its memory was freed and nothing new was cached."""


class UnloadInterrupted(MlnbError):
    """Unloading was interrupted (KeyboardInterrupt) while it waited for a generation in another thread; the pipeline
    stays loaded and cached."""
