"""Attention-side techniques: xformers, attention slicing, feed-forward chunking.

PyTorch's scaled-dot-product attention (SDPA) is already memory-efficient, and the design notes measured that
attention slicing under SDPA only slows generation (1.5x, same peak). So slicing runs only when neither xformers
nor SDPA is in use, and xformers runs only when it imports and passes diffusers' own smoke test on this GPU.
"""

from __future__ import annotations

import logging

from ..levels import Technique
from .context import OptimizeContext, applied, denoiser_of, not_requested, skipped
from .report import TechniqueResult

logger = logging.getLogger(__name__)

__all__ = ["apply_xformers", "apply_attention_slicing", "apply_forward_chunking", "sdpa_available"]


def sdpa_available() -> bool:
    import torch.nn.functional as F

    return hasattr(F, "scaled_dot_product_attention")


def apply_xformers(pipe, ctx: OptimizeContext) -> TechniqueResult:
    tech = Technique.XFORMERS
    if not ctx.config.xformers:
        return not_requested(tech, ctx)
    fallback = "SDPA in use" if sdpa_available() else "default attention in use"
    if not ctx.device.is_cuda:
        return skipped(tech, f"xformers needs a CUDA device; {fallback}")
    try:
        import xformers  # noqa: F401
        import xformers.ops  # noqa: F401
    except Exception as exc:  # ImportError, or an xformers built for another torch raising on import
        reason = "not installed" if isinstance(exc, ImportError) else f"fails to import ({type(exc).__name__}: {exc})"
        return skipped(tech, f"xformers {reason}; {fallback}")
    if not hasattr(pipe, "enable_xformers_memory_efficient_attention"):
        return skipped(tech, f"{type(pipe).__name__} cannot use xformers; {fallback}")
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception as exc:  # diffusers runs a test kernel first; a wheel for another GPU/torch fails here
        logger.warning("xformers did not run (%s); using SDPA", exc)
        return skipped(tech, f"xformers failed its test on this GPU ({type(exc).__name__}); {fallback}")
    pipe._mlnb_xformers = True
    return applied(tech, "xformers memory-efficient attention", "xformers")


def apply_attention_slicing(pipe, ctx: OptimizeContext) -> TechniqueResult:
    tech = Technique.ATTENTION_SLICING
    if not ctx.config.attention_slicing:
        return not_requested(tech, ctx)
    if getattr(pipe, "_mlnb_xformers", False):
        return skipped(tech, "xformers in use: slicing would only slow it")
    if sdpa_available():
        return skipped(tech, "SDPA in use: slicing only slows it (1.5x, same peak, measured)")
    if not hasattr(pipe, "enable_attention_slicing"):
        return skipped(tech, f"{type(pipe).__name__} has no enable_attention_slicing")
    pipe.enable_attention_slicing("auto")
    return applied(tech, "attention computed in slices (auto slice size)", "attention slicing")


def apply_forward_chunking(pipe, ctx: OptimizeContext) -> TechniqueResult:
    tech = Technique.FORWARD_CHUNKING
    if not ctx.config.forward_chunking:
        return not_requested(tech, ctx)
    model = denoiser_of(pipe)
    if model is None:
        return skipped(tech, f"{type(pipe).__name__} has no denoiser")
    if not hasattr(model, "enable_forward_chunking"):
        return skipped(tech, f"{type(model).__name__} does not implement enable_forward_chunking")
    model.enable_forward_chunking(chunk_size=1, dim=1)
    return applied(tech, f"{type(model).__name__} feed-forward in chunks of 1 along the sequence", "FF chunking")
