"""Tiny random LoRAs for the tiny pipelines, built with peft and saved in diffusers' LoRA format.

The denoiser's attention projections are adapted: the UNet's for SD1.5 and SDXL, the transformer's for SD3 and Flux
(their attention layers have the same ``to_q``/``to_k``/``to_v``/``to_out.0`` names).

The adapters are made on models built from a tiny pipeline's own configs (no weights are read), with non-zero B
matrices so that a LoRA visibly changes the image, and saved with the pipeline class's ``save_lora_weights`` as
safetensors (or as a pickle ``.bin`` for the refusal tests). A LoRA built for ``"sdxl"`` is a LoRA for another
architecture as far as the ``"sd"`` pipeline is concerned: its cross-attention takes 64 features, not 32, and its
second down block has two transformer blocks.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["tiny_lora", "UNET_ATTENTION", "TEXT_ATTENTION"]

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet's attention projections
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's


def _pipeline_folder(kind_or_model: str | os.PathLike) -> Path:
    from ..tiny import TINY_KINDS, default_tiny_model

    if str(kind_or_model) in TINY_KINDS:
        return default_tiny_model(str(kind_or_model))
    folder = Path(kind_or_model)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{kind_or_model!r} is neither a tiny kind ({', '.join(TINY_KINDS)}) nor a pipeline folder")
    return folder


def _adapter_state(model, targets, rank: int, prefix: str = "") -> dict:
    """Inject a rank-``rank`` LoRA on ``targets`` into ``model`` (random A and B) and return its peft state dict,
    each key starting with ``prefix``."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False)
    inject_adapter_in_model(config, model, adapter_name="tiny")
    state = get_peft_model_state_dict(model, adapter_name="tiny")
    return {(k if k.startswith(prefix) else prefix + k): v.detach().clone() for k, v in state.items()}


def tiny_lora(
    kind_or_model: str | os.PathLike = "sd",
    path: str | os.PathLike | None = None,
    rank: int = 4,
    seed: int = 0,
    targets: tuple[str, ...] = UNET_ATTENTION,
    text_encoder: bool = False,
    pickle: bool = False,
) -> Path:
    """Build and save a tiny random LoRA for a tiny pipeline.

    Args:
        kind_or_model: ``"sd"``, ``"sdxl"``, ``"sd3"`` or ``"flux"`` (the embedded tiny model of that kind gives the
            shapes), or a tiny pipeline folder made by :func:`mlnb.testing.tiny_pipeline`.
        path: the target folder (created); a fresh temporary folder when None.
        rank: the LoRA rank.
        seed: the seed of the random A and B matrices: the same arguments give the same file.
        targets: the denoiser's module names the LoRA adapts (peft ``target_modules``).
        text_encoder: also adapt the CLIP text encoder(s)' attention projections.
        pickle: save ``pytorch_lora_weights.bin`` (pickle) instead of ``.safetensors``.

    Returns:
        The saved weights file, ready for ``pipe.load_lora_weights(file)`` or mlnb's ``loras=[file]``.

    Example:
        ```python
        >>> from mlnb.testing import tiny_lora, tiny_pipeline
        >>> model = tiny_pipeline("sd", "/tmp/tiny-sd")
        >>> lora = tiny_lora(model, "/tmp/tiny-lora", seed=1)
        ```
    """
    import diffusers
    import torch
    import transformers
    folder = _pipeline_folder(kind_or_model)
    out = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix="mlnb-tiny-lora-"))
    out.mkdir(parents=True, exist_ok=True)
    layers: dict[str, dict] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        index = json.loads((folder / "model_index.json").read_text())
        denoiser = "unet" if "unet" in index else "transformer"
        model_class = getattr(diffusers, index[denoiser][1])
        model = model_class.from_config(model_class.load_config(folder / denoiser))
        layers[f"{denoiser}_lora_layers"] = _adapter_state(model, targets, rank)
        for name in ("text_encoder", "text_encoder_2") if text_encoder else ():
            if name in index and index[name][1].startswith("CLIP"):
                model_class = getattr(transformers, index[name][1])
                model = model_class(model_class.config_class.from_pretrained(folder / name))
                # The keys as CLIP LoRAs in the wild have them (``text_model.encoder...``): diffusers strips the
                # prefix for a transformers whose CLIP models have no ``text_model`` level, not the other way round.
                layers[f"{name}_lora_layers"] = _adapter_state(model, TEXT_ATTENTION, rank, prefix="text_model.")
    pipeline_class = getattr(diffusers, index["_class_name"])
    pipeline_class.save_lora_weights(out, safe_serialization=not pickle, **layers)
    return out / ("pytorch_lora_weights.bin" if pickle else "pytorch_lora_weights.safetensors")
