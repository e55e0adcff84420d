"""VAE tiling and slicing, on ``pipe.vae`` (the pipeline-level switches are gone in diffusers 0.40+).

``vae.enable_tiling()`` alone tiles at ``config.sample_size``, which is 1024 for SDXL: a 1024² image is then
decoded in one piece and tiling does nothing. The tile size is therefore set for the budget
(:func:`mlnb.levels.choose_vae_tile`) or taken from the config.

An ``AutoencoderKL`` blends each seam between tiles in a Python loop over the overlap's rows (``blend_v``) or
columns (``blend_h``), with several tensor operations for each: a 1024² decode in 256 px tiles (36 tiles, 64 px
overlaps, 60 seams of 64 rows of 4 operations) launches about 15,000 small kernels to blend. mlnb gives the VAE one
operation per seam instead (:func:`blend_seams_at_once`), with the same weights: bitwise the same image when the
overlap is a power of two (it is 64 px for 256 px tiles), within the dtype's rounding otherwise.
"""

from __future__ import annotations

import logging

from ..levels import Technique, choose_vae_tile
from .context import OptimizeContext, applied, not_requested, skipped
from .report import TechniqueResult

logger = logging.getLogger(__name__)

__all__ = [
    "apply_vae_tiling", "apply_vae_slicing", "vae_decode_dtype", "set_vae_tiles", "blend_seams_at_once",
    "decode_in_bf16", "cast_at_the_vae_s_edges",
]


def vae_decode_dtype(pipe) -> str | None:
    """The dtype the VAE decodes in: fp32 when the pipeline upcasts an fp16 VAE (SDXL's ``force_upcast``); None
    without a VAE."""
    import torch

    from .offload import vae_needs_upcast

    vae = getattr(pipe, "vae", None)
    if vae is None:
        return None
    dtype = torch.float32 if vae_needs_upcast(pipe) else vae.dtype
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


def decode_in_bf16(pipe) -> bool:
    """Store and run the VAE in bf16 where the pipeline would cast it from fp16 to fp32 for every decode.

    An SDXL pipeline upcasts its fp16 VAE before each decode (``force_upcast``: fp16 overflows in the decoder) and
    casts it back after. bf16 has fp32's range, so it does not overflow, and it takes half of fp32's memory; on a card
    of compute capability 8.0 and up it runs on the tensor cores (ComfyUI decodes SD VAEs in bf16 on those cards for
    the same reasons). The VAE is cast once; its dtype is then not fp16, so the pipeline no longer upcasts it. What
    enters it (latents, or an image to encode) is cast to bf16, and the decoder's output to fp32, so the pipeline's
    post-processing rounds from fp32 as it does after an fp32 decode.

    Returns whether it did so: only for a VAE the pipeline would upcast (:func:`~.offload.vae_needs_upcast`). The
    caller checks the card (:attr:`mlnb.device.DeviceInfo.native_bf16`): on a T4, bf16 is emulated and slow.
    """
    import torch

    from .offload import vae_needs_upcast

    if not vae_needs_upcast(pipe):
        return False
    vae = pipe.vae
    vae.to(dtype=torch.bfloat16)
    cast_at_the_vae_s_edges(vae)
    return True


def cast_at_the_vae_s_edges(vae) -> None:
    """Cast what enters ``vae``'s encoder and decoder (and their quant convs) to the dtype of its weights at that
    moment, and the decoder's output to fp32: the VAE can then run in another dtype than the pipeline's latents."""
    import torch

    if getattr(vae, "_mlnb_edges_cast", False):
        return
    for name in ("quant_conv", "encoder", "post_quant_conv", "decoder"):
        module = getattr(vae, name, None)
        if isinstance(module, torch.nn.Module):
            module.register_forward_pre_hook(_inputs_in_own_dtype, with_kwargs=True)
    if isinstance(getattr(vae, "decoder", None), torch.nn.Module):
        vae.decoder.register_forward_hook(_output_in_fp32)
    vae._mlnb_edges_cast = True


def _inputs_in_own_dtype(module, args, kwargs):
    import torch

    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args), kwargs


def _output_in_fp32(module, args, output):
    return output.float() if hasattr(output, "float") else output


def set_vae_tiles(vae, tile: int, blend_at_once: bool = True) -> None:
    """Turn on tiled decoding in ``tile``-pixel tiles (an ``AutoencoderKL``'s latent tile follows its scale), its
    seams blended in one operation each unless ``blend_at_once`` is False (plain diffusers, for a baseline)."""
    vae.enable_tiling()
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // 2 ** (len(vae.config.block_out_channels) - 1)
    if blend_at_once:
        blend_seams_at_once(vae)


def _blend(a, b, extent: int, dim: int):
    """``b`` with its first ``extent`` rows (``dim`` -2) or columns (-1) faded in from the last of ``a``: the weight
    of ``b`` rises from 0 by ``1 / extent`` a row, as in diffusers' ``blend_v``/``blend_h``, in one operation."""
    import torch

    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    shape = [1] * b.dim()
    shape[dim] = extent
    weight = (torch.arange(extent, device=b.device, dtype=torch.float32) / extent).view(shape)
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * (1 - weight) + head * weight)
    return b


def blend_seams_at_once(vae) -> bool:
    """Give an ``AutoencoderKL`` (SD1.5, SDXL) seam blending in one operation per seam instead of one per row or
    column of the overlap; its class is untouched. Returns False for another VAE (left as it is)."""
    import functools

    if type(vae).__name__ != "AutoencoderKL" or not (hasattr(vae, "blend_v") and hasattr(vae, "blend_h")):
        return False
    vae.blend_v = functools.partial(_blend, dim=-2)
    vae.blend_h = functools.partial(_blend, dim=-1)
    return True


def apply_vae_tiling(pipe, ctx: OptimizeContext) -> TechniqueResult:
    tech = Technique.VAE_TILING
    if not ctx.config.vae_tiling:
        return not_requested(tech, ctx)
    vae = getattr(pipe, "vae", None)
    if vae is None or not hasattr(vae, "enable_tiling"):
        return skipped(tech, "the pipeline has no VAE with tiling")
    if hasattr(vae, "tile_sample_min_size") and hasattr(vae, "tile_latent_min_size"):
        sample_size = vae.config.sample_size
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        tile = ctx.config.vae_tile_size or choose_vae_tile(ctx.free_bytes, sample_size, ctx.config.level)
        set_vae_tiles(vae, tile)
        logger.debug("VAE tiles %d px (latent %d)", tile, vae.tile_latent_min_size)
        dtype = vae_decode_dtype(pipe)
        return applied(tech, f"{dtype} decode in {tile}x{tile} px tiles, 25% overlap, each seam blended at once",
                       f"VAE {dtype} tiles {tile}")
    vae.enable_tiling()
    return applied(tech, f"{type(vae).__name__} tiles at its default size", "VAE tiles")


def apply_vae_slicing(pipe, ctx: OptimizeContext) -> TechniqueResult:
    tech = Technique.VAE_SLICING
    if not ctx.config.vae_slicing:
        return not_requested(tech, ctx)
    vae = getattr(pipe, "vae", None)
    if vae is None or not hasattr(vae, "enable_slicing"):
        return skipped(tech, "the pipeline has no VAE with slicing")
    vae.enable_slicing()
    return applied(tech, "a batch is decoded one image at a time", None)
