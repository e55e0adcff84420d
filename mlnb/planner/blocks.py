"""A pipeline's weights as the planner sees them: the denoiser's blocks, the text encoders' units, and the bytes of
each (:class:`~mlnb.planner.cost.ModelFacts`), plus the key a model's measurements are cached under.

A block is a unit the planner keeps resident or streams: each item of the denoiser's block lists and its
``mid_block``, split into its children while it is larger than :data:`MAX_BLOCK` (a finer double buffer). One hook
per block, not per layer, keeps the streaming overhead to the copies (``docs/planner.md``). An offloaded text encoder
streams in units cut the same way (T5's ``encoder.block`` list item by item).

In a transformer denoiser the planner knows (SD3, Flux: :mod:`.models`), the embedders and norms around the block
lists (``time_text_embed``, ``context_embedder``, ``norm_out`` ...) are units too, and every unit is listed in the
order the forward runs it, a block cut into sub-units included. A denoiser with no block list is one the planner does
not know: it has no blocks, and is planned as a whole (resident, or refused with the budget it needs).
"""

from __future__ import annotations

from ..optimizer.context import denoiser_of
from ..optimizer.weights import module_bytes
from ..units import MiB
from .cost import Block, ModelFacts
from .models import denoiser_family, execution_order
from .packed import module_tensors
from .pinning import layout

__all__ = ["MAX_BLOCK", "model_facts", "model_key", "denoiser_blocks", "denoiser_units", "model_units", "unit_block",
           "text_encoders", "with_adapters"]

MAX_BLOCK = 256 * MiB  # units larger than this are split into their children (read when a pipeline is split)


def _split(name: str, module, max_block: int, scoped: bool = False, seen: set | None = None) -> list:
    """``module`` as units ``(dotted name, module)`` none larger than ``max_block`` where the tree allows; with
    ``scoped``, children in the order they run (:func:`.models.execution_order`). A module whose tensors all belong to
    units listed before (a tied table such as T5's ``shared``) is no unit: it never runs, and would be packed twice."""
    import torch

    seen = set() if seen is None else seen
    tensors = {id(t) for t in list(module.parameters()) + list(module.buffers())}
    if tensors and tensors <= seen:
        return []
    children = execution_order(module, scoped)
    # A ModuleList is never called (its owner calls the items, or indexes one, as attention does with to_out[0]):
    # a hook on it would never onload its weights, so its items are the units, however small.
    container = isinstance(module, torch.nn.ModuleList)
    if not container and (module_bytes(module) <= max_block or not children):
        seen |= tensors
        return [(name, module)]
    out = []
    for child_name, child in children:
        if module_bytes(child):
            out += _split(f"{name}.{child_name}" if name else child_name, child, max_block, scoped, seen)
    return out  # parameters owned by this module itself count as the denoiser's "other" bytes


def denoiser_units(denoiser, max_block: int | None = None) -> list[tuple[str, object]]:
    """The denoiser's blocks ``(dotted name, module)`` in execution order, none larger than ``max_block`` bytes
    (default :data:`MAX_BLOCK`) where the module tree allows.

    A UNet's are the items of its block lists and its ``mid_block``; a transformer's the items of its block lists;
    an SD3 or Flux transformer's also the embedders and norms around them, each block's sub-units in the order they
    run. A denoiser with no block list has none."""
    import torch

    max_block = MAX_BLOCK if max_block is None else max_block
    if denoiser_family(denoiser) is not None:
        seen: set = set()
        return [unit for child_name, child in execution_order(denoiser) if module_bytes(child)
                for unit in _split(child_name, child, max_block, scoped=True, seen=seen)]
    found = []
    for name, child in denoiser.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for index, block in enumerate(child):
                found += _split(f"{name}.{index}", block, max_block)
        elif name in ("mid_block",) and child is not None:
            found += _split(name, child, max_block)
    return found


def model_units(module, max_block: int | None = None) -> list[tuple[str, object]]:
    """A whole model (a text encoder) split into streamable units in the order they run (``""`` when it is one unit
    itself); a tied copy of a table another unit holds is left out."""
    max_block = MAX_BLOCK if max_block is None else max_block
    if module_bytes(module) <= max_block:
        return [("", module)]
    return _split("", module, max_block, scoped=True)


def text_encoders(pipe) -> dict:
    """The pipeline's text encoders by component name (``text_encoder``, ``text_encoder_2`` ...)."""
    import torch

    return {
        name: module for name, module in pipe.components.items()
        if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)
    }


def unit_block(name: str, module) -> Block:
    """The planner's facts of one streamable unit: its bytes, and where the streamer's packing of its tensors
    (:func:`.pinning.layout`) lets it split at the ring's end."""
    return Block(name, module_bytes(module), layout(module_tensors(module)).offsets[1:])


def model_facts(pipe, max_block: int | None = None) -> ModelFacts:
    """Weight bytes of ``pipe`` by component and denoiser block (execution order).

    Args:
        pipe: a diffusers pipeline with a ``unet`` or ``transformer``.
        max_block: the largest block in bytes (default :data:`MAX_BLOCK`); larger ones are split.

    Raises:
        ValueError: the pipeline has no denoiser to plan for.
    """
    denoiser = denoiser_of(pipe)
    if denoiser is None:
        raise ValueError(f"{type(pipe).__name__} has no unet or transformer to plan for")
    blocks = [unit_block(name, module) for name, module in denoiser_units(denoiser, max_block)]
    encoders = text_encoders(pipe)
    vae = getattr(pipe, "vae", None)
    bytes_per_param = next(denoiser.parameters()).element_size()
    # an offloaded encoder's streamer holds two slots of its largest unit (one when it is a single unit)
    slots, encoder_units = [], {}
    for name, encoder in encoders.items():
        units = [module_bytes(unit) for _, unit in model_units(encoder, max_block)]
        encoder_units[name] = tuple(units)
        if units:
            slots.append(min(2, len(units)) * max(units))
    return ModelFacts(
        encoders={name: module_bytes(module) for name, module in encoders.items()},
        vae=module_bytes(vae) if vae is not None else 0,
        blocks=tuple(blocks),
        denoiser_other=module_bytes(denoiser) - sum(b.nbytes for b in blocks),
        bytes_per_param=bytes_per_param,
        encoder_slots=max(slots, default=None),
        encoder_units=encoder_units,
    )


def _adapter_bytes(module) -> int:
    """Bytes of the LoRA adapter weights (peft's ``lora_*`` parameters) inside ``module``."""
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if ".lora_" in f".{n}")


def with_adapters(facts: ModelFacts, pipe) -> ModelFacts:
    """``facts`` (made before any LoRA was applied) with the bytes of ``pipe``'s LoRA adapters added where they
    live: a denoiser block's adapters to that block (they are streamed with it, or resident with it), the rest of
    the denoiser's to its resident part, a text encoder's to that encoder.

    Args:
        facts: the pipeline's facts without adapters (:func:`model_facts` before the LoRAs).
        pipe: the pipeline, with its adapters applied.
    """
    import dataclasses

    denoiser = denoiser_of(pipe)
    if denoiser is None:
        return facts
    modules = dict(denoiser.named_modules())
    blocks = tuple(
        dataclasses.replace(b, nbytes=b.nbytes + _adapter_bytes(modules[b.name]),
                            cuts=unit_block(b.name, modules[b.name]).cuts) if b.name in modules else b
        for b in facts.blocks
    )
    in_blocks = sum(b.nbytes for b in blocks) - sum(b.nbytes for b in facts.blocks)
    encoders = {name: nbytes + _adapter_bytes(getattr(pipe, name)) for name, nbytes in facts.encoders.items()}
    return dataclasses.replace(
        facts, blocks=blocks, encoders=encoders,
        denoiser_other=facts.denoiser_other + _adapter_bytes(denoiser) - in_blocks,
    )


def denoiser_blocks(pipe, max_block: int | None = None) -> dict:
    """The denoiser's blocks by name, as :func:`model_facts` lists them (the units a plan keeps or streams)."""
    denoiser = denoiser_of(pipe)
    return dict(denoiser_units(denoiser, max_block)) if denoiser is not None else {}


def model_key(pipe, dtype) -> str:
    """The key under which a model's measurements (step time, activations) are cached.

    For example ``"UNet2DConditionModel-2567463684-float16"``.

    The denoiser's class and parameter count (not its name or path: the same architecture runs at the same speed)
    and the compute dtype (fp8 storage computes in it too).
    """
    denoiser = denoiser_of(pipe)
    if denoiser is None:
        raise ValueError(f"{type(pipe).__name__} has no unet or transformer")
    params = sum(p.numel() for p in denoiser.parameters())
    return f"{type(denoiser).__name__}-{params}-{str(dtype).removeprefix('torch.')}"
