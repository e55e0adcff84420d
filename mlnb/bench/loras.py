"""Random LoRAs of a given rank over a model's attention projections, with the real shapes, for the benchmark.

A LoRA's cost (bytes, the two thin matmuls per adapted layer, the time to load and switch it) depends on its rank and
on the shapes of the layers it adapts, not on its values. :func:`write_loras` builds the denoiser of a pipeline folder
from its config on the ``meta`` device (no memory, no weights read) and gives every attention projection (``to_q``,
``to_k``, ``to_v``, ``to_out.0``, and the joint attention's ``add_*_proj`` and ``to_add_out`` in SD3 and Flux) an
A matrix of ``rank × in_features`` and a B matrix of ``out_features × rank`` under peft's keys
(``PATH.lora_A.weight``: what ``get_peft_model_state_dict`` writes for an adapter peft injects there, without its
cost, which grows with the square of the layer count), fills them with random values in fp16 and saves them with
the pipeline class's ``save_lora_weights`` as ``.safetensors``: a file that ``pipe.load_lora_weights`` and mlnb's
``loras=`` read as they read a LoRA from the hub. The values are small, so an
image stays finite; they differ from file to file (the seed).

Two sets are written: the LoRAs every LoRA run loads, and as many others that a run switches to and back to time a
switch (:mod:`.worker`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["ATTENTION_PROJECTIONS", "lora_targets", "adapter_shapes", "write_loras", "lora_sets"]

# peft target names: matched against the end of each module's path
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_MARKER = "mlnb-bench-loras.json"  # written last: a folder without it is an interrupted build


def _denoiser_on_meta(folder: Path):
    """``(component name, model)``: the pipeline's UNet or transformer built from its config on the meta device."""
    import diffusers
    from accelerate import init_empty_weights

    index = json.loads((folder / "model_index.json").read_text())
    for name in ("unet", "transformer"):
        if name in index and index[name][0] is not None:
            cls = getattr(diffusers, index[name][1])
            with init_empty_weights():
                return name, cls.from_config(cls.load_config(folder / name))
    raise ValueError(f"{folder} has no UNet or transformer to adapt")


def lora_targets(model) -> list[str]:
    """The paths of the linear layers of ``model`` that the benchmark's LoRAs adapt (its attention projections)."""
    import torch

    return [
        path for path, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and any(path == t or path.endswith("." + t) for t in ATTENTION_PROJECTIONS)
    ]


def adapter_shapes(folder: str | Path, rank: int) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The component a rank-``rank`` LoRA of the pipeline in ``folder`` adapts (``unet`` or ``transformer``), and
    the shape of each of its A and B matrices under peft's keys; computed on the meta device, nothing allocated."""
    component, model = _denoiser_on_meta(Path(folder))
    shapes: dict[str, tuple[int, ...]] = {}
    for path in lora_targets(model):
        layer = model.get_submodule(path)
        shapes[f"{path}.lora_A.weight"] = (rank, layer.in_features)
        shapes[f"{path}.lora_B.weight"] = (layer.out_features, rank)
    if not shapes:
        raise ValueError(f"{type(model).__name__} has no attention projections to adapt")
    return component, shapes


def write_loras(folder: str | Path, out: str | Path, count: int, rank: int, seed: int = 0) -> dict:
    """Write ``count`` random rank-``rank`` LoRAs for the pipeline in ``folder`` to ``out``, and ``count`` more to
    switch to: ``out/lora-00.safetensors``... (the run's set), then ``out/switch-00.safetensors``...

    A folder that already holds the same LoRAs (model folder, count, rank and seed) is reused.

    Returns:
        ``{"loras": [paths], "switch": [paths], "rank", "component", "layers", "file_bytes", "seconds", "reused"}``;
        ``file_bytes`` is the size of one file, ``layers`` the number of layers each LoRA adapts.
    """
    import diffusers
    import torch

    folder, out = Path(folder), Path(out)
    key = {"model": str(folder.resolve()), "count": count, "rank": rank, "seed": seed}
    marker = out / _MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if all(info.get(k) == v for k, v in key.items()):
            return dict(info, reused=True)
    start = time.perf_counter()
    component, shapes = adapter_shapes(folder, rank)
    pipeline_class = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    paths: dict[str, list[str]] = {"loras": [], "switch": []}
    for kind, stem in (("loras", "lora"), ("switch", "switch")):
        for i in range(count):
            state = {k: (torch.randn(s, generator=generator) * 0.01).to(torch.float16) for k, s in shapes.items()}
            target = out / f"{stem}-{i:02d}"
            pipeline_class.save_lora_weights(target, safe_serialization=True, **{f"{component}_lora_layers": state})
            paths[kind].append(str(target / "pytorch_lora_weights.safetensors"))
    file_bytes = Path(paths["loras"][0]).stat().st_size if count else 0
    info = dict(key, **paths, component=component, layers=len(shapes) // 2, file_bytes=file_bytes,
                seconds=round(time.perf_counter() - start, 3))
    marker.write_text(json.dumps(info))
    logger.info("%d + %d rank-%d LoRAs of %d layers, %d bytes each, in %s", count, count, rank, info["layers"],
                file_bytes, out)
    return dict(info, reused=False)


def lora_sets(info: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The run's LoRAs and the set it switches to, from :func:`write_loras`'s result."""
    return tuple(info.get("loras", ())), tuple(info.get("switch", ()))
