"""What the planner knows of each model family beyond its module tree: the order in which a model's children run,
and the image size a pipeline makes by default.

A transformer denoiser's forward does not call its children in the order they are registered. A Flux single-stream
block registers ``norm, proj_mlp, proj_out, attn`` and runs ``norm, proj_mlp, attn, proj_out``; its attention
registers the query and key norms first and runs them after the projections. The streamer records the real order in
its first forward, but the planner cuts the units before anything runs, and its spread of streamed blocks, the
block timeline and the schedule replay all read the units as listed: so they are listed in the order the forward runs
them, from :data:`EXECUTION_ORDER`. Each entry was read off a forward of the tiny SD3 and Flux pipelines
(:mod:`mlnb.tiny.dit`) with forward-pre-hooks on every module (``tests/test_dit_plan.py`` repeats that trace).

The tables apply inside the models named in :data:`KNOWN_DENOISERS` and in text encoders, never to a UNet (whose
blocks already run in the order they are registered). A child that a table does not name keeps its registration
order, after the named ones.
"""

from __future__ import annotations

__all__ = ["EXECUTION_ORDER", "KNOWN_DENOISERS", "execution_order", "native_size", "denoiser_family"]

# Module class -> its children in the order its forward calls them.
EXECUTION_ORDER: dict[str, tuple[str, ...]] = {
    # SD3 and SD3.5 (MMDiT)
    "SD3Transformer2DModel": ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks", "norm_out",
                              "proj_out"),
    "JointTransformerBlock": ("norm1", "norm1_context", "attn", "attn2", "norm2", "ff", "norm2_context",
                              "ff_context"),
    # diffusers' Attention with the joint processor: projections, then the query/key norms, the image output last
    "Attention": ("to_q", "to_k", "to_v", "norm_q", "norm_k", "add_q_proj", "add_k_proj", "add_v_proj",
                  "norm_added_q", "norm_added_k", "to_add_out", "to_out"),
    # FLUX.1
    "FluxTransformer2DModel": ("x_embedder", "time_text_embed", "context_embedder", "pos_embed", "transformer_blocks",
                               "single_transformer_blocks", "norm_out", "proj_out"),
    "FluxTransformerBlock": ("norm1", "norm1_context", "attn", "norm2", "ff", "norm2_context", "ff_context"),
    "FluxSingleTransformerBlock": ("norm", "proj_mlp", "attn", "proj_out"),
    "FluxAttention": ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "norm_q", "norm_k",
                      "norm_added_q", "norm_added_k", "to_out", "to_add_out"),
    # T5 encoders (T5-XXL): the shared input table runs as encoder.embed_tokens, never through ``shared``
    "T5EncoderModel": ("encoder", "shared"),
    "T5Stack": ("embed_tokens", "block", "final_layer_norm"),
}

# The transformer denoisers whose children (the embedders and norms around the block lists, too) are planner units.
KNOWN_DENOISERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}

def denoiser_family(denoiser) -> str | None:
    """``"sd3"`` or ``"flux"`` for a transformer denoiser of :data:`KNOWN_DENOISERS`, else None."""
    return KNOWN_DENOISERS.get(type(denoiser).__name__)


def execution_order(module, scoped: bool = True) -> list[tuple[str, object]]:
    """``module``'s children ``(name, child)`` in the order its forward calls them: as :data:`EXECUTION_ORDER` says
    for its class, the children it does not name after those in registration order.

    Args:
        module: any ``torch.nn.Module``.
        scoped: False gives the registration order (the table is for transformer denoisers and text encoders).
    """
    children = list(module.named_children())
    order = EXECUTION_ORDER.get(type(module).__name__) if scoped else None
    if not order:
        return children
    rank = {name: index for index, name in enumerate(order)}
    return sorted(children, key=lambda item: rank.get(item[0], len(order)))  # stable: the unnamed keep their order


def native_size(pipe) -> tuple[int, int]:
    """``(width, height)`` a pipeline makes when none is given.

    A pipeline with a ``default_sample_size`` (SDXL, SD3, Flux) uses it in latent pixels: FluxPipeline's is a fixed
    128, so FLUX.1 makes 1024² (its transformer has no ``sample_size``), SD3's is its transformer's ``sample_size``.
    Otherwise the denoiser's ``sample_size`` (SD1.5's UNet: 64), else 64. Times the VAE's scale (8 for the real
    models).

    Args:
        pipe: a diffusers pipeline.

    Example:
        ```python
        >>> native_size(FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev"))
        (1024, 1024)
        ```
    """
    size = getattr(pipe, "default_sample_size", None)
    if not size:
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        size = getattr(getattr(denoiser, "config", None), "sample_size", None) or 64
    if isinstance(size, (list, tuple)):
        size = size[0]
    scale = getattr(pipe, "vae_scale_factor", None) or 8
    return int(size) * int(scale), int(size) * int(scale)
