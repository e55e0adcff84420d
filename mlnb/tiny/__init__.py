"""Tiny random-weight diffusers pipelines: the demo's embedded model, the benchmark's CPU stand-ins, and the models
of the tests and notebooks (there is no hub here). :mod:`mlnb.testing` exports them.

They go through the real ``save_pretrained``/``from_pretrained`` path: a UNet, a VAE, CLIP text encoder(s) and a
CLIP tokenizer with a byte-level vocabulary, all seeded so the same call gives the same weights.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .clip import text_config as _text_config
from .clip import write_clip_tokenizer

__all__ = ["tiny_pipeline", "default_tiny_model", "write_clip_tokenizer", "TINY_KINDS"]

TINY_KINDS = ("sd", "sdxl", "sd3", "flux")


def tiny_pipeline(kind: str = "sd", path: str | os.PathLike | None = None, pickle: bool = False) -> Path:
    """Build and save a tiny random-weight ``"sd"``, ``"sdxl"``, ``"sd3"`` or ``"flux"`` pipeline.

    Args:
        kind: ``"sd"`` (StableDiffusionPipeline), ``"sdxl"``, ``"sd3"`` or ``"flux"`` (the transformer denoisers of
            :mod:`mlnb.tiny.dit`).
        path: target folder (created); a fresh temporary folder when None.
        pickle: save ``.bin`` pickle weights instead of safetensors (to test the safetensors-only rule).

    Returns:
        The folder, ready for ``mlnb.load_pipeline(path)`` or ``DiffusionPipeline.from_pretrained(path)``.

    Example:
        ```python
        >>> from mlnb.testing import tiny_pipeline
        >>> folder = tiny_pipeline("sdxl", "/tmp/tiny-sdxl")
        ```
    """
    if kind not in TINY_KINDS:
        raise ValueError(f"kind must be one of {TINY_KINDS}, got {kind!r}")
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    folder = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix=f"mlnb-tiny-{kind}-"))
    folder.mkdir(parents=True, exist_ok=True)
    if kind in ("sd3", "flux"):
        from .dit import tiny_dit_pipeline

        return tiny_dit_pipeline(kind, folder, pickle=pickle)
    torch.manual_seed(0)
    unet_kw = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    if kind == "sd":
        unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=8, **unet_kw)
    else:
        unet = UNet2DConditionModel(
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + 32 pooled text dims
            **unet_kw,
        )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        force_upcast=(kind == "sdxl"),  # as the real SDXL VAE config
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_clip_tokenizer(Path(tmp) / "tokenizer")
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer")
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(_text_config(vocab_size))
    if kind == "sd":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    else:
        from diffusers import StableDiffusionXLPipeline

        torch.manual_seed(2)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size))
        pipe = StableDiffusionXLPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler,
        )
    from ..pipeline.files import quiet_hf_progress

    with quiet_hf_progress():
        pipe.save_pretrained(folder, safe_serialization=not pickle)
    return folder


def default_tiny_model(kind: str = "sd") -> Path:
    """The embedded tiny model, built once under ``$MLNB_CACHE`` (default ``~/.cache/mlnb``)."""
    root = Path(os.environ.get("MLNB_CACHE", Path.home() / ".cache" / "mlnb"))
    folder = root / f"tiny-{kind}"
    if not (folder / "model_index.json").exists():
        tmp = Path(tempfile.mkdtemp(prefix=f"tiny-{kind}-", dir=_ensure(root)))
        tiny_pipeline(kind, tmp)
        try:
            tmp.rename(folder)  # atomic: a half-written model is never picked up
        except OSError:  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder
