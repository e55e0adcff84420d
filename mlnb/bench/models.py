"""The benchmark's models: the real SD1.5 and SDXL-base architectures with random weights, or the tiny test models.

GPU memory and time depend on the shapes of the weights, not on their values. ``archs/sd15.json`` and
``archs/sdxl.json`` hold the component configs of the public ``stable-diffusion-v1-5`` and
``stable-diffusion-xl-base-1.0`` models, so a pipeline built from them with random weights costs what the real one
costs. Building is fast: every module is created on the ``meta`` device (no memory, no init), then each parameter is
allocated once, directly in the target dtype on the target device, and filled with ``normal_(0, 0.02)`` (weights),
ones (norm scales) or zeros (biases). On a GPU this takes a second or two even for SDXL's 2.6 B-parameter UNet.

The random-weight pipeline is saved once as fp16 safetensors (:func:`save_arch_pipeline`) and every recipe then loads
that folder the way a user loads a downloaded model, so loading costs (host RAM, time) are measured too.

The tokenizer is the byte-level CLIP tokenizer of :mod:`mlnb.tiny_models` (``model_max_length=77``): no hub is needed,
prompts still encode to real token ids, and the text encoders keep their full 49 408-entry embedding tables.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHS",
    "TINY_KINDS",
    "ModelSource",
    "load_arch",
    "arch_params",
    "native_size",
    "build_arch_pipeline",
    "save_arch_pipeline",
    "tiny_source",
    "model_source",
    "folder_native_size",
]

ARCHS = ("sd15", "sdxl")
TINY_KINDS = {"sd15": "sd", "sdxl": "sdxl"}  # the tiny mlnb.testing model that stands in on a CPU
_NATIVE = {"sd15": 512, "sdxl": 1024}
_MARKER = "mlnb-bench-build.json"  # written last: a folder without it is an interrupted build


@dataclass(frozen=True)
class ModelSource:
    """What one benchmark model is and where its recipes load it from.

    Args:
        name: the name in the table (``"sd15"``, ``"sdxl"`` or the folder/id of ``--model``).
        path: a diffusers folder (or hub id) that every recipe loads.
        kind: ``"arch"`` (real shapes, random weights), ``"tiny"`` (CPU harness check) or ``"model"`` (``--model``).
        size: the side of the square image generated, in pixels (``None``: the pipeline's native size).
        build: how the folder was made (seconds, bytes on disk), when the benchmark made it.
    """

    name: str
    path: str
    kind: str
    size: int | None = None
    build: dict = field(default_factory=dict)


def load_arch(name: str) -> dict:
    """The stored component configs of ``"sd15"`` or ``"sdxl"``, including ``_params`` (parameter counts).

    Raises:
        ValueError: naming the architecture and the known ones.
    """
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}: use one of {', '.join(ARCHS)}")
    text = resources.files("mlnb.bench").joinpath("archs").joinpath(f"{name}.json").read_text()
    return json.loads(text)


def arch_params(name: str) -> dict[str, int]:
    """Parameter count per component of the public model, e.g. ``{"unet": 2567463684, ...}``."""
    return dict(load_arch(name)["_params"])


def native_size(name: str) -> int:
    """The native resolution (square side in pixels): 512 for SD1.5, 1024 for SDXL."""
    return _NATIVE[name]


def _config(section: dict) -> dict:
    drop = {"transformers_version", "model_type"}
    return {k: v for k, v in section.items() if not k.startswith("_") and k not in drop}


def _materialize(module, device: str, dtype, generator) -> None:
    """Give every meta parameter real storage on ``device`` in ``dtype``, filled with random values."""
    import torch

    made: dict[int, torch.nn.Parameter] = {}  # tied parameters stay tied
    with torch.no_grad():
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is None:
                    continue
                if id(param) not in made:
                    target = dtype if param.is_floating_point() else param.dtype
                    data = torch.empty(param.shape, dtype=target, device=device)
                    if data.ndim >= 2:
                        data.normal_(0.0, 0.02, generator=generator)
                    elif name == "bias":
                        data.zero_()
                    else:  # norm scales, embedding gains
                        data.fill_(1.0)
                    made[id(param)] = torch.nn.Parameter(data, requires_grad=param.requires_grad)
                sub._parameters[name] = made[id(param)]
            for name, buf in list(sub._buffers.items()):
                if buf is not None:  # real tensors (position ids...), built on the CPU
                    target = dtype if buf.is_floating_point() else buf.dtype
                    sub._buffers[name] = buf.to(device=device, dtype=target)


def _tokenizer():
    from transformers import CLIPTokenizer

    from ..tiny_models import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)


def _text_config(section: dict, tokenizer):
    from transformers import CLIPTextConfig

    config = _config(section)
    # Same shapes (vocab 49408); the special ids follow the byte-level tokenizer so the pooled output is read at
    # the real end-of-text position.
    config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextConfig(**config)


def build_arch_pipeline(name: str, device: str = "cpu", dtype=None, seed: int = 0):
    """Build the ``"sd15"`` or ``"sdxl"`` pipeline with its real shapes and random weights.

    Args:
        name: ``"sd15"`` (StableDiffusionPipeline) or ``"sdxl"`` (StableDiffusionXLPipeline).
        device: where the weights are allocated and initialised (``"cuda"`` is fastest; ``"meta"`` gives the shapes
            without memory, e.g. for :func:`mlnb.planner.blocks.model_facts`).
        dtype: weights dtype (default fp16).
        seed: seed of the random weights.

    Returns:
        The diffusers pipeline, with no safety checker.

    Example:
        ```python
        >>> pipe = build_arch_pipeline("sdxl", device="cuda")
        >>> sum(p.numel() for p in pipe.unet.parameters())
        2567463684
        ```
    """
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    arch = load_arch(name)
    dtype = dtype or torch.float16
    tokenizer = _tokenizer()
    # Buffers stay real (include_buffers=False): they hold values such as CLIP's position ids.
    with init_empty_weights(include_buffers=False):
        unet = UNet2DConditionModel.from_config(_config(arch["unet"]))
        vae = AutoencoderKL.from_config(_config(arch["vae"]))
        text_encoder = CLIPTextModel(_text_config(arch["text_encoder"], tokenizer))
        text_encoder_2 = (
            CLIPTextModelWithProjection(_text_config(arch["text_encoder_2"], tokenizer)) if "text_encoder_2" in arch else None
        )
    # On "meta" nothing is allocated or filled: the shapes alone (what the planner needs) in no memory.
    generator = None if str(device) == "meta" else torch.Generator(device=device).manual_seed(seed)
    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is not None:
            _materialize(module, device, dtype, generator)
            module.eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    if text_encoder_2 is None:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler,
    )


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def save_arch_pipeline(name: str, folder: str | os.PathLike, device: str = "cpu", seed: int = 0) -> dict:
    """Build the random-weight ``name`` pipeline on ``device`` and save it as fp16 safetensors in ``folder``.

    A folder already holding a finished build of the same architecture and seed is reused. The build goes to a
    sibling temporary folder that is renamed at the end, so an interrupted build is never picked up.

    Returns:
        ``{"model", "seconds", "disk_bytes", "reused"}`` (seconds of build plus save).
    """
    folder = Path(folder)
    marker = folder / _MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("model") == name and info.get("seed") == seed:
            logger.info("reusing the %s build in %s", name, folder)
            return dict(info, reused=True)
    start = time.perf_counter()
    pipe = build_arch_pipeline(name, device=device, seed=seed)
    built = time.perf_counter()
    logger.info("built %s on %s in %.1f s; saving to %s", name, device, built - start, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        del pipe
        info = {
            "model": name,
            "seed": seed,
            "build_seconds": round(built - start, 3),
            "seconds": round(time.perf_counter() - start, 3),
            "disk_bytes": _folder_bytes(tmp),
        }
        (tmp / _MARKER).write_text(json.dumps(info))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(info, reused=False)


def tiny_source(name: str) -> ModelSource:
    """The tiny :mod:`mlnb.tiny_models` model standing in for ``"sd15"``/``"sdxl"`` on a CPU (built once, cached)."""
    from ..tiny_models import default_tiny_model

    if name not in TINY_KINDS:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(TINY_KINDS)}")
    path = str(default_tiny_model(TINY_KINDS[name]))
    return ModelSource(name=name, path=path, kind="tiny", size=folder_native_size(path))


def model_source(model: str, size: int | None = None) -> ModelSource:
    """A user-given model (``--model``): a local diffusers folder or a hub id, loaded as is."""
    text = os.fspath(model).rstrip("/")
    return ModelSource(name=Path(text).name or text, path=text, kind="model", size=size or folder_native_size(text))


def folder_native_size(path: str | os.PathLike) -> int | None:
    """The native image side of a local UNet pipeline folder (UNet ``sample_size`` × VAE scale), else ``None``.

    Read from the configs, without loading weights; ``None`` for a hub id or another layout (the pipeline's own
    default is then used and reported).
    """
    try:
        unet = json.loads((Path(path) / "unet" / "config.json").read_text())
        vae = json.loads((Path(path) / "vae" / "config.json").read_text())
        size = unet["sample_size"]
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None
