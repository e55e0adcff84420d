"""fp8 weight storage through diffusers' layerwise casting (storage fp8, compute in the pipeline's dtype)."""

from __future__ import annotations

import logging

from ..levels import Technique
from .context import OptimizeContext, applied, denoiser_of, not_requested, skipped
from .report import TechniqueResult

logger = logging.getLogger(__name__)

__all__ = ["apply_fp8_storage", "store_fp8"]


def store_fp8(model) -> None:
    """Store ``model``'s weights as ``float8_e4m3fn``, upcast to its current dtype for each layer's forward."""
    import torch

    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=model.dtype)
    model._mlnb_fp8 = True


def apply_fp8_storage(pipe, ctx: OptimizeContext) -> TechniqueResult:
    """Store the denoiser's weights in ``float8_e4m3fn`` and upcast each layer for its forward.

    Must run before any offload hook is installed (diffusers applies casting under the offload hooks). Norm and
    embedding layers stay in the compute dtype (diffusers' default skip patterns).
    """
    tech = Technique.FP8_STORAGE
    if not ctx.config.fp8_storage:
        return not_requested(tech, ctx)
    import torch

    if not hasattr(torch, "float8_e4m3fn"):
        return skipped(tech, f"torch {torch.__version__} has no float8_e4m3fn dtype")
    model = denoiser_of(pipe)
    if model is None or not hasattr(model, "enable_layerwise_casting"):
        return skipped(tech, f"{type(pipe).__name__} has no denoiser with enable_layerwise_casting")
    if getattr(model, "_mlnb_fp8", False):
        return skipped(tech, "already stored in fp8")
    compute = model.dtype
    if compute not in (torch.float16, torch.bfloat16, torch.float32):
        return skipped(tech, f"compute dtype {compute} is not fp16/bf16/fp32")
    store_fp8(model)
    name = str(compute).replace("torch.", "").replace("float", "fp").replace("bfp", "bf")
    logger.debug("fp8 storage on %s, compute %s", type(model).__name__, name)
    return applied(tech, f"{type(model).__name__} weights stored as fp8 (e4m3), computed in {name}", "fp8 storage")
