"""Loading, caching and generating: ``load_pipeline`` -> ``ManagedPipeline.generate`` -> ``GenerationResult``."""

from .managed import ManagedPipeline, cached_pipelines, last_result, load_pipeline, unload_all
from .rescue import generate_with_rescue
from .result import GenerationResult, save_images

__all__ = [
    "ManagedPipeline",
    "GenerationResult",
    "load_pipeline",
    "last_result",
    "cached_pipelines",
    "unload_all",
    "generate_with_rescue",
    "save_images",
]
