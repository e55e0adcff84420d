"""Loading, caching and generating: ``load_pipeline`` -> ``ManagedPipeline.generate`` -> ``GenerationResult``.

By job: :mod:`.loading` (``load_pipeline``, the choice of a level or a plan), :mod:`.cache` (the cached pipelines,
the last result, room on the GPU), :mod:`.validation` (argument checks), :mod:`.managed` (``ManagedPipeline``),
:mod:`.result` (``GenerationResult``), :mod:`.rescue` (the OOM rescue) and :mod:`.files` (a model's files).
"""

from .cache import cached_pipelines, last_result, unload_all
from .loading import load_pipeline
from .managed import ManagedPipeline
from .rescue import generate_with_rescue
from .result import GenerationResult
from .saving import save_images
from .validation import GenerationArgs

__all__ = [
    "ManagedPipeline",
    "GenerationResult",
    "GenerationArgs",
    "load_pipeline",
    "last_result",
    "cached_pipelines",
    "unload_all",
    "generate_with_rescue",
    "save_images",
]
