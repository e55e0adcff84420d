"""Tiny random-weight transformer-denoiser pipelines: SD3 (MMDiT) and Flux, saved like a downloaded model.

They have the shapes of the real architectures in miniature, so every code path that depends on the layout runs:

- ``"sd3"``: a :class:`~diffusers.StableDiffusion3Pipeline` with an ``SD3Transformer2DModel`` of two joint blocks
  (the first with SD3.5's second image attention, ``dual_attention_layers``, and RMS QK norm as SD3.5 has), a
  16-channel ``AutoencoderKL``, two CLIP text encoders with projection and a T5 encoder.
- ``"flux"``: a :class:`~diffusers.FluxPipeline` with a ``FluxTransformer2DModel`` of two double-stream
  (``transformer_blocks``) and two single-stream (``single_transformer_blocks``) blocks and a guidance embedder as
  FLUX.1-dev has, a 16-channel ``AutoencoderKL``, a CLIP text encoder and a T5 encoder.

Both native sizes are 64×64 pixels for SD3 (the transformer's ``sample_size`` 32 × the VAE's scale 2); FluxPipeline
has a fixed default of 128 latent pixels (256×256 here), so callers ask for 64×64. The VAEs keep the real
``force_upcast``, ``scaling_factor`` and ``shift_factor`` and have no quant convolutions, as SD3's and Flux's have.

The CLIP tokenizer is :mod:`mlnb.tiny`'s byte-level one. The T5 tokenizer is a ``T5TokenizerFast`` over a small
Unigram vocabulary (the printable ASCII characters, alone and after the word-start mark ``▁``) built in code, so no
SentencePiece model or hub download is needed and any prompt still encodes to real token ids.
"""

from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path

__all__ = ["TINY_DIT_KINDS", "tiny_dit_pipeline", "t5_tokenizer"]

TINY_DIT_KINDS = ("sd3", "flux")

_T5_DIM = 64  # the T5 encoder's width: the transformers' joint_attention_dim; SD3 pads its two CLIPs (2 × 32) to it


def t5_tokenizer(model_max_length: int = 512):
    """A ``T5TokenizerFast`` with a small Unigram vocabulary that works offline.

    Ids follow T5's layout: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then the word-start mark and the pieces.

    Args:
        model_max_length: the longest sequence the tokenizer declares (FluxPipeline pads T5 prompts to 512).

    Example:
        ```python
        >>> tok = t5_tokenizer()
        >>> tok("a fox").input_ids[-1] == tok.eos_token_id
        True
        ```
    """
    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("▁" + c, -4.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _t5_encoder(vocab_size: int, seed: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1 (XXL's family): gated GELU, untied head, relative attention buckets.
    config = T5Config(
        vocab_size=vocab_size, d_model=_T5_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, tie_word_embeddings=False, is_encoder_decoder=False, pad_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config)


def _vae(kind: str):
    from diffusers import AutoencoderKL

    # SD3's and Flux's VAEs differ only in their latent statistics.
    scaling, shift = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}[kind]
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,  # as the real SD3.5 and FLUX.1 VAE configs
    )


def _sd3(clip_tokenizer, clip_vocab: int, t5_tok):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from .clip import text_config as _text_config

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,  # = heads × head dim, as in every SD3 model
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=64,  # the two CLIPs' projections (32 + 32) side by side
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = _vae("sd3")
    torch.manual_seed(1)
    text_encoder = CLIPTextModelWithProjection(_text_config(clip_vocab))
    torch.manual_seed(2)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(clip_vocab))
    text_encoder_3 = _t5_encoder(len(t5_tok), seed=3)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tok,
    )


def _flux(clip_tokenizer, clip_vocab: int, t5_tok):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from .clip import text_config as _text_config

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2×2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=32,  # the CLIP's pooled output
        guidance_embeds=True,  # FLUX.1-dev's distilled guidance
        axes_dims_rope=(4, 6, 6),  # sums to the head dim
    )
    vae = _vae("flux")
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(_text_config(clip_vocab))
    text_encoder_2 = _t5_encoder(len(t5_tok), seed=2)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tok,
    )


def tiny_dit_pipeline(kind: str, path: str | os.PathLike, pickle: bool = False) -> Path:
    """Build and save a tiny random-weight ``"sd3"`` (StableDiffusion3Pipeline) or ``"flux"`` (FluxPipeline).

    Args:
        kind: ``"sd3"`` or ``"flux"``.
        path: target folder (created).
        pickle: save ``.bin`` pickle weights instead of safetensors.

    Returns:
        The folder, ready for ``mlnb.load_pipeline(path)`` or ``DiffusionPipeline.from_pretrained(path)``.

    Example:
        ```python
        >>> folder = tiny_dit_pipeline("flux", "/tmp/tiny-flux")
        >>> mlnb.load_pipeline(folder).generate("a fox", width=64, height=64, steps=2)
        ```
    """
    if kind not in TINY_DIT_KINDS:
        raise ValueError(f"kind must be one of {TINY_DIT_KINDS}, got {kind!r}")
    from transformers import CLIPTokenizer

    from ..pipeline.files import quiet_hf_progress
    from .clip import write_clip_tokenizer as _write_tokenizer

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        clip_vocab = _write_tokenizer(Path(tmp) / "tokenizer")
        clip_tokenizer = CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer")
    pipe = (_sd3 if kind == "sd3" else _flux)(clip_tokenizer, clip_vocab, t5_tokenizer())
    with quiet_hf_progress():
        pipe.save_pretrained(folder, safe_serialization=not pickle)
    return folder
