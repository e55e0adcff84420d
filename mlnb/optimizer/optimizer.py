"""``MemoryOptimizer``: apply a config's techniques to a diffusers pipeline and report each one honestly."""

from __future__ import annotations

import logging

from ..device import Device, get_device
from ..levels import MemoryOptimizationConfig, Technique
from ..monitor import cleanup
from .attention import apply_attention_slicing, apply_forward_chunking, apply_xformers
from .context import OptimizeContext, applied, not_requested, skipped
from .offload import apply_group_offload, apply_model_cpu_offload, apply_sequential_cpu_offload
from .precision import apply_fp8_storage
from .report import OptimizationReport, TechniqueResult
from .vae import apply_vae_slicing, apply_vae_tiling

logger = logging.getLogger(__name__)

__all__ = ["MemoryOptimizer", "OptimizationReport", "TechniqueResult"]


class MemoryOptimizer:
    """Applies a :class:`~mlnb.MemoryOptimizationConfig` to a pipeline.

    Techniques are applied in an order that composes: fp8 storage before any offload hook, attention and VAE
    settings next, then exactly one offload, then placement (a pipeline with no offload is moved to the GPU) and
    the after-load cleanup. Each of the eleven comes back applied or skipped with its reason.

    Args:
        config: the techniques to apply.
        device: the device to optimize for (default: the current device).

    Example:
        ```python
        >>> from mlnb import MemoryOptimizer, MemoryOptimizationConfig
        >>> report = MemoryOptimizer(MemoryOptimizationConfig.from_level("balanced")).optimize_pipeline(pipe)
        >>> print(report)
        ```
    """

    def __init__(self, config: MemoryOptimizationConfig, device: Device | None = None) -> None:
        if not isinstance(config, MemoryOptimizationConfig):
            raise TypeError(
                f"config must be a MemoryOptimizationConfig (MemoryOptimizationConfig.from_level({config!r})?), "
                f"got {type(config).__name__}"
            )
        self.config = config
        self.device = device or get_device()

    def optimize_pipeline(self, pipe) -> OptimizationReport:
        """Apply the techniques to ``pipe`` in place; returns the applied/skipped list.

        A pipeline can be optimized once: offload hooks cannot be stacked or cleanly undone, so a second call
        raises instead of pretending. Load a fresh pipeline for another level.
        """
        if not hasattr(pipe, "components") or not callable(getattr(pipe, "__call__", None)):
            raise TypeError(f"optimize_pipeline takes a diffusers pipeline, got {type(pipe).__name__}")
        if getattr(pipe, "_mlnb_optimized", None) is not None:
            raise RuntimeError(
                f"this pipeline was already optimized at level {pipe._mlnb_optimized}; offload hooks cannot be "
                "undone, so load it again (mlnb.load_pipeline caches one pipeline per level)"
            )
        ctx = OptimizeContext(self.config, self.device, self.device.free_bytes())
        results: dict[Technique, TechniqueResult] = {}

        def record(result: TechniqueResult | None) -> None:
            if result is not None:
                results[result.technique] = result

        record(apply_fp8_storage(pipe, ctx))
        record(apply_xformers(pipe, ctx))
        record(apply_attention_slicing(pipe, ctx))
        record(apply_forward_chunking(pipe, ctx))
        record(apply_vae_tiling(pipe, ctx))
        record(apply_vae_slicing(pipe, ctx))

        record(apply_model_cpu_offload(pipe, ctx))
        group, fallback = apply_group_offload(pipe, ctx)
        record(group)
        record(fallback if fallback is not None else apply_sequential_cpu_offload(pipe, ctx))

        offloaded = any(results[t].applied for t in _OFFLOADS)
        if not offloaded and self.device.is_cuda:
            pipe.to(self.device.torch_device)
            logger.debug("no offload: whole pipeline placed on %s", self.device.torch_device)

        steps = cleanup(self.device, collect=self.config.gc_collect, empty_cache=self.config.cuda_cache_clear)
        record(_cleanup_result(Technique.GC_COLLECT, ctx, "gc_collect" in steps, "no CUDA device"))
        record(
            _cleanup_result(Technique.CUDA_CACHE_CLEAR, ctx, "cuda_cache_clear" in steps, "no CUDA device: no allocator cache")
        )
        pipe._mlnb_optimized = self.config.level.value
        ordered = tuple(results[t] for t in Technique)
        return OptimizationReport(self.config.level, ordered)


_OFFLOADS = (Technique.MODEL_CPU_OFFLOAD, Technique.SEQUENTIAL_CPU_OFFLOAD, Technique.GROUP_OFFLOAD)


def _cleanup_result(tech: Technique, ctx: OptimizeContext, ran: bool, why_not: str) -> TechniqueResult:
    if not getattr(ctx.config, tech.value):
        return not_requested(tech, ctx)
    if ran:
        if tech is Technique.GC_COLLECT:
            return applied(tech, "ran after load; runs again on unload, on error, and once idle after generations that left GPU memory held")
        return applied(tech, "ran after load; runs again once idle after generations, on unload and on error")
    return skipped(tech, why_not)
