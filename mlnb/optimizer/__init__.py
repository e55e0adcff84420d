"""The memory optimizer: eleven techniques applied to a diffusers pipeline, each reported honestly."""

from .optimizer import MemoryOptimizer
from .report import OptimizationReport, TechniqueResult

__all__ = ["MemoryOptimizer", "OptimizationReport", "TechniqueResult"]
