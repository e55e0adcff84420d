"""The three offloads, through diffusers' own hooks: model CPU offload, sequential CPU offload, group offloading.

A component gets at most one offload (the config refuses two). Without a CUDA device all three are skipped: there
is nothing to onload to. The SDXL trap: SDXL pipelines upcast an fp16 VAE with ``force_upcast`` to fp32 for the
decode (``vae.to(float32)``), which crashes group offloading with a dtype mismatch at leaf and block level. mlnb
therefore excludes such a VAE from group offloading and keeps it resident on the GPU (84 M parameters: 0.16 GiB in
fp16), so the upcast and the tiled fp32 decode run as diffusers intends. On a card that computes bf16 in hardware,
:func:`mlnb.load_pipeline` stores such a VAE in bf16 first (:func:`.vae.decode_in_bf16`): nothing is upcast, and it
is offloaded like the rest.
"""

from __future__ import annotations

import logging

from ..levels import Technique
from ..units import format_bytes
from .context import OptimizeContext, applied, not_requested, skipped
from .report import TechniqueResult
from .weights import weight_bytes

logger = logging.getLogger(__name__)

__all__ = ["apply_model_cpu_offload", "apply_sequential_cpu_offload", "apply_group_offload", "vae_needs_upcast"]

_NO_CUDA = "no CUDA device: weights stay where compute runs (CPU)"


def vae_needs_upcast(pipe) -> bool:
    """True when the fp16 VAE decodes in fp32: the pipeline casts it (SDXL with ``force_upcast``), or a budget plan
    casts it on the GPU as it arrives there (:func:`mlnb.planner.streaming.pin_whole` with ``compute_dtype``)."""
    import torch

    vae = getattr(pipe, "vae", None)
    if vae is None or vae.dtype != torch.float16:
        return False
    if getattr(vae, "_mlnb_upcast_on_gpu", False):
        return True
    return hasattr(pipe, "upcast_vae") and bool(getattr(vae.config, "force_upcast", False))


def apply_model_cpu_offload(pipe, ctx: OptimizeContext) -> TechniqueResult:
    tech = Technique.MODEL_CPU_OFFLOAD
    if not ctx.config.model_cpu_offload:
        return not_requested(tech, ctx)
    if not ctx.device.is_cuda:
        return skipped(tech, _NO_CUDA)
    pipe.enable_model_cpu_offload(device=ctx.device.torch_device)
    return applied(tech, "each component moves to the GPU while it runs (accelerate hooks)", "model offload")


def apply_sequential_cpu_offload(pipe, ctx: OptimizeContext, reason: str | None = None) -> TechniqueResult:
    tech = Technique.SEQUENTIAL_CPU_OFFLOAD
    if not ctx.config.sequential_cpu_offload and reason is None:
        return not_requested(tech, ctx)
    if not ctx.device.is_cuda:
        return skipped(tech, _NO_CUDA)
    pipe.enable_sequential_cpu_offload(device=ctx.device.torch_device)
    detail = "every leaf module streams to the GPU for its forward"
    return applied(tech, f"{detail} ({reason})" if reason else detail, "sequential offload")


def _pinned_copy_too_big(pipe, ctx: OptimizeContext, notes: list[str]) -> bool:
    """With streams, diffusers pre-pins a host copy of the weights (about 2x the model in RAM, per its docs).

    When the host has less than that available (Colab: 12.7 GB in all), pin on the fly instead
    (``low_cpu_mem_usage=True``), which is slower but does not take the kernel down.
    """
    available = ctx.device.info().host_available_bytes
    weights = weight_bytes(pipe)
    if available is None or available >= 2 * weights:
        return False
    logger.warning(
        "host RAM available (%s) is under 2x the weights (%s): group offloading pins on the fly",
        format_bytes(available), format_bytes(weights),
    )
    notes.append(f"pins on the fly: {format_bytes(available)} host RAM free < 2x weights {format_bytes(weights)}")
    return True


def apply_group_offload(pipe, ctx: OptimizeContext) -> tuple[TechniqueResult, TechniqueResult | None]:
    """Group offloading; falls back to sequential offload on a diffusers without it.

    Returns the group offload result and, when the fallback ran, the sequential offload result.
    """
    tech = Technique.GROUP_OFFLOAD
    cfg = ctx.config
    if not cfg.group_offload:
        return not_requested(tech, ctx), None
    if not ctx.device.is_cuda:
        return skipped(tech, _NO_CUDA), None
    if not hasattr(pipe, "enable_group_offload"):
        fallback = apply_sequential_cpu_offload(pipe, ctx, reason="fallback: no group offloading in this diffusers")
        return skipped(tech, "this diffusers has no DiffusionPipeline.enable_group_offload"), fallback
    import torch

    exclude: list[str] = []
    notes: list[str] = []
    if vae_needs_upcast(pipe):
        exclude.append("vae")
        notes.append("VAE kept on GPU: its force_upcast fp32 decode crashes group offloading")
    kind = "leaf" if cfg.group_offload_type == "leaf_level" else "block"
    stream = cfg.group_offload_use_stream
    low_cpu_mem = stream and _pinned_copy_too_big(pipe, ctx, notes)
    pipe.enable_group_offload(
        onload_device=torch.device(ctx.device.torch_device),
        offload_device=torch.device("cpu"),
        offload_type=cfg.group_offload_type,
        num_blocks_per_group=1 if cfg.group_offload_type == "block_level" else None,
        use_stream=stream,
        low_cpu_mem_usage=low_cpu_mem,
        exclude_modules=exclude or None,
    )
    for name in exclude:
        getattr(pipe, name).to(ctx.device.torch_device)
    label = f"group offload {kind}{'+stream' if stream else ''}"
    detail = f"{kind}-level groups onloaded {'on a CUDA stream from pinned memory' if stream else 'synchronously'}"
    if notes:
        detail += "; " + "; ".join(notes)
    return applied(tech, detail, label), None
