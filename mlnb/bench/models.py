"""The benchmark's models: real architectures with random weights (SD1.5, SDXL-base, SD3.5 medium and large,
FLUX.1-dev), or the tiny test models.

GPU memory and time depend on the shapes of the weights, not on their values. ``archs/NAME.json`` holds the component
configs of the public model (``stable-diffusion-v1-5``, ``stable-diffusion-xl-base-1.0``,
``stable-diffusion-3.5-medium``, ``stable-diffusion-3.5-large``, ``FLUX.1-dev``), the class of each component
(``_classes``), its parameter count (``_params``) and where the configs come from (``_note``), so a pipeline built
from them with random weights costs what the real one costs. Building is fast: every module is created on the
``meta`` device (no memory, no init), then each parameter is allocated once, directly in the target dtype on the
target device, and filled with ``normal_(0, 0.02)`` (weights), ones (norm scales) or zeros (biases). On a GPU this
takes a second or two even for SDXL's 2.6 B-parameter UNet.

The random-weight pipeline is saved once as fp16 safetensors (:func:`save_arch_pipeline`) and every recipe then loads
that folder the way a user loads a downloaded model, so loading costs (host RAM, time) are measured too.

The tokenizer is the byte-level CLIP tokenizer of :mod:`mlnb.tiny` (``model_max_length=77``): no hub is needed,
prompts still encode to real token ids, and the text encoders keep their full 49 408-entry embedding tables. A T5
encoder gets the small offline T5 tokenizer of :mod:`mlnb.tiny.dit`, whose ids are T5's first ones, and keeps
its full 32 128-entry table.
"""

from __future__ import annotations

import importlib
import inspect
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

ARCHS = ("sd15", "sdxl", "sd35-medium", "sd35-large", "flux-dev")
# the tiny mlnb.testing model that stands in on a CPU
TINY_KINDS = {"sd15": "sd", "sdxl": "sdxl", "sd35-medium": "sd3", "sd35-large": "sd3", "flux-dev": "flux"}
_NATIVE = {"sd15": 512, "sdxl": 1024, "sd35-medium": 1024, "sd35-large": 1024, "flux-dev": 1024}
_TINY_SIZE = 64  # the side the tiny models are made for (FluxPipeline's own default would be 256 for them)
_MARKER = "mlnb-bench-build.json"  # written last: a folder without it is an interrupted build


@dataclass(frozen=True)
class ModelSource:
    """What one benchmark model is and where its recipes load it from.

    Args:
        name: the name in the table (one of :data:`ARCHS`, or the folder/id of ``--model``).
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
    """The stored component configs of an architecture of :data:`ARCHS`, with ``_classes``, ``_params`` (parameter
    counts) and ``_note`` (where the configs come from).

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
    """The native resolution (square side in pixels): 512 for SD1.5, 1024 for the others."""
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

    from ..tiny import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)


def _class(path: str):
    """``"diffusers.AutoencoderKL"`` -> the class."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _component(path: str, section: dict, tokenizer):
    """One model of the pipeline (``path``: its class, e.g. ``"transformers.T5EncoderModel"``) from its stored config;
    called under ``init_empty_weights``."""
    cls = _class(path)
    if path.startswith("diffusers."):
        return cls.from_config(_config(section))
    config = _config(section)
    if cls.config_class.model_type == "clip_text_model":
        # Same shapes (vocab 49408); the special ids follow the byte-level tokenizer so the pooled output is read at
        # the real end-of-text position.
        config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return cls(cls.config_class(**config))


def _scheduler(arch: dict):
    if "scheduler" in arch:  # the flow-matching models store theirs
        return _class(arch["_classes"]["scheduler"]).from_config(_config(arch["scheduler"]))
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )


def _pipeline(arch: dict, models: dict, tokenizer):
    """The pipeline of ``arch`` around its models, each text encoder with its tokenizer and no safety checker."""
    from ..tiny.dit import t5_tokenizer

    parts = dict(models, scheduler=_scheduler(arch))
    for key, model in models.items():
        if key.startswith("text_encoder"):
            t5 = model.config.model_type == "t5"
            parts["tokenizer" + key[len("text_encoder"):]] = t5_tokenizer() if t5 else tokenizer
    cls = _class(arch["_classes"]["pipeline"])
    if "requires_safety_checker" in inspect.signature(cls.__init__).parameters:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return cls(**parts)


def build_arch_pipeline(name: str, device: str = "cpu", dtype=None, seed: int = 0):
    """Build an architecture of :data:`ARCHS` with its real shapes and random weights.

    Args:
        name: ``"sd15"`` (StableDiffusionPipeline), ``"sdxl"`` (StableDiffusionXLPipeline), ``"sd35-medium"`` or
            ``"sd35-large"`` (StableDiffusion3Pipeline) or ``"flux-dev"`` (FluxPipeline).
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

    arch = load_arch(name)
    dtype = dtype or torch.float16
    tokenizer = _tokenizer()
    classes = {key: path for key, path in arch["_classes"].items() if key not in ("pipeline", "scheduler")}
    # Off the meta device buffers stay real: they hold values such as CLIP's position ids and SD3's sin-cos position
    # table (0.9 GiB in fp32 for SD3.5 medium, seconds to compute); on it only their shapes count.
    with init_empty_weights(include_buffers=str(device) == "meta"):
        models = {key: _component(path, arch[key], tokenizer) for key, path in classes.items()}
    # On "meta" nothing is allocated or filled: the shapes alone (what the planner needs) in no memory.
    generator = None if str(device) == "meta" else torch.Generator(device=device).manual_seed(seed)
    for model in models.values():
        if hasattr(model, "tie_weights"):  # a transformers model: T5's input embedding is its shared table, a tie
            model.tie_weights()  # that init_empty_weights undoes by replacing each parameter with its own meta copy
        _materialize(model, device, dtype, generator)
        model.eval()
    return _pipeline(arch, models, tokenizer)


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
    """The tiny :mod:`mlnb.tiny` model standing in for an architecture on a CPU (built once, cached)."""
    from ..tiny import default_tiny_model

    if name not in TINY_KINDS:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(TINY_KINDS)}")
    path = str(default_tiny_model(TINY_KINDS[name]))
    return ModelSource(name=name, path=path, kind="tiny", size=folder_native_size(path) or _TINY_SIZE)


def model_source(model: str, size: int | None = None) -> ModelSource:
    """A user-given model (``--model``): a local diffusers folder or a hub id, loaded as is."""
    text = os.fspath(model).rstrip("/")
    return ModelSource(name=Path(text).name or text, path=text, kind="model", size=size or folder_native_size(text))


def folder_native_size(path: str | os.PathLike) -> int | None:
    """The native image side of a local pipeline folder (the UNet's or transformer's ``sample_size`` × VAE scale),
    else ``None``.

    Read from the configs, without loading weights; ``None`` for a hub id or a denoiser without ``sample_size``
    (Flux's transformer), for which the pipeline's own default is then used and reported.
    """
    folder = Path(path)
    try:
        denoiser = folder / "unet" if (folder / "unet").is_dir() else folder / "transformer"
        config = json.loads((denoiser / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        size = config["sample_size"]
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None
