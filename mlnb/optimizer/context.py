"""What every technique needs to know besides the pipeline and the config."""

from __future__ import annotations

from dataclasses import dataclass

from ..device import Device
from ..levels import MemoryOptimizationConfig, Technique
from .report import TechniqueResult

__all__ = ["OptimizeContext", "skipped", "applied", "not_requested", "denoiser_of"]


@dataclass
class OptimizeContext:
    config: MemoryOptimizationConfig
    device: Device
    free_bytes: int | None = None  # free device memory when the plan was made


def applied(technique: Technique, detail: str, label: str | None = None) -> TechniqueResult:
    return TechniqueResult(technique, True, detail, label)


def skipped(technique: Technique, reason: str) -> TechniqueResult:
    return TechniqueResult(technique, False, reason)


def not_requested(technique: Technique, ctx: OptimizeContext) -> TechniqueResult:
    return skipped(technique, f"not part of level {ctx.config.level.value}")


def denoiser_of(pipe):
    """The pipeline's denoiser (``unet`` or ``transformer``), or None."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    return None
