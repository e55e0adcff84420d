"""Applying a budget :class:`~mlnb.plan.Plan` to a pipeline: resident blocks on the GPU, the rest streamed.

The pieces are hooks in diffusers' and accelerate's hook systems: one on each streamed denoiser block and on each
unit of an offloaded text encoder (:mod:`.streaming`: pinned memory, GPU slots (two, or three for the denoiser where
the plan says), each unit's copy issued on a copy stream as many units ahead), so only streamed weights are pinned;
for the VAE, an accelerate hook that copies it whole from one pinned region (cast to fp32 on the GPU when it decodes
in fp32), which its ``decode`` triggers through diffusers' ``apply_forward_hook`` and which leaves the GPU when the
next image's encoders or denoiser start; ``enable_layerwise_casting`` for fp8 storage. Everything else of the
denoiser is moved to the GPU part by part, never whole, so a card smaller than the denoiser never holds it all at
once.

Order matters for host RAM: the kept part goes to the GPU first, a part of at most 256 MiB at a time, the pages of
the mapped weight files it read handed back to the OS every 64 MiB moved (a copy to the card reads them all; kept
whole, SDXL's resident plan peaked at 5.19 GiB of host RSS on a CPU stand-in, part by part at 0.61 GiB:
``scripts/host_ram_standin.py``), and only then are the streamed blocks and encoders pinned, packed into
power-of-two buffers one buffer at a time (:mod:`.pinning`: torch rounds each pinned block up to a power of two),
each pageable original released as soon as it is copied. The process never holds the whole model twice, and pinned
memory is the streamed bytes, not up to twice them.

Blocks, not layers: on an H100, SD1.5 with 10 blocks streamed layer by layer took 67 ms a step against 29 ms
unoffloaded; the per-layer hooks cost more than the 570 MiB of copies (11 ms at 54 GB/s). One hook per block (at
most 256 MiB) keeps the overhead to the copies.
"""

from __future__ import annotations

import gc
import logging

from ..device import get_device
from ..levels import OptimizationLevel, Technique
from ..monitor import cleanup, give_back_host_memory, release_mapped_weights
from ..plan import Block, ModelFacts, Plan
from ..units import MiB, format_bytes
from .context import applied, denoiser_of, skipped
from .precision import store_fp8
from .report import OptimizationReport, TechniqueResult
from .offload import vae_needs_upcast
from .streaming import pin_whole, stream_units
from .vae import cast_at_the_vae_s_edges, set_vae_tiles
from .weights import module_bytes

logger = logging.getLogger(__name__)

__all__ = ["model_facts", "model_key", "denoiser_blocks", "apply_plan", "plan_level"]

_MAX_BLOCK = 256 * MiB  # blocks larger than this are split into their children: a finer double buffer


def _split(name: str, module, max_block: int) -> list[tuple[str, object]]:
    import torch

    children = list(module.named_children())
    # A ModuleList is never called (its owner calls the items, or indexes one, as attention does with to_out[0]):
    # a hook on it would never onload its weights, so its items are the units, however small.
    container = isinstance(module, torch.nn.ModuleList)
    if not container and (module_bytes(module) <= max_block or not children):
        return [(name, module)]
    out = []
    for child_name, child in children:
        if module_bytes(child):
            out += _split(f"{name}.{child_name}", child, max_block)
    return out  # parameters owned by this module itself count as the denoiser's "other" bytes


def _blocks(denoiser, max_block: int) -> list[tuple[str, object]]:
    import torch

    found = []
    for name, child in denoiser.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for index, block in enumerate(child):
                found += _split(f"{name}.{index}", block, max_block)
        elif name in ("mid_block",) and child is not None:
            found += _split(name, child, max_block)
    return found


def _units(module, max_block: int) -> list[tuple[str, object]]:
    """A whole model split into streamable units (``""`` when it is one unit itself)."""
    if module_bytes(module) <= max_block:
        return [("", module)]
    out = []
    for name, child in module.named_children():
        if module_bytes(child):
            out += _split(name, child, max_block)
    return out


def _text_encoders(pipe) -> dict:
    """The pipeline's text encoders by component name (``text_encoder``, ``text_encoder_2`` ...)."""
    import torch

    return {
        name: module for name, module in pipe.components.items()
        if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)
    }


def model_facts(pipe, max_block: int = _MAX_BLOCK) -> ModelFacts:
    """Weight bytes of ``pipe`` by component and denoiser block (execution order)."""
    denoiser = denoiser_of(pipe)
    if denoiser is None:
        raise ValueError(f"{type(pipe).__name__} has no unet or transformer to plan for")
    blocks = [Block(name, module_bytes(module)) for name, module in _blocks(denoiser, max_block)]
    encoders = {name: module_bytes(module) for name, module in _text_encoders(pipe).items()}
    vae = getattr(pipe, "vae", None)
    bytes_per_param = next(denoiser.parameters()).element_size()
    # an offloaded encoder's streamer holds two slots of its largest unit (one when it is a single unit)
    slots = []
    for encoder in _text_encoders(pipe).values():
        units = [module_bytes(unit) for _, unit in _units(encoder, max_block)]
        if units:
            slots.append(min(2, len(units)) * max(units))
    return ModelFacts(
        encoders=encoders,
        vae=module_bytes(vae) if vae is not None else 0,
        blocks=tuple(blocks),
        denoiser_other=module_bytes(denoiser) - sum(b.nbytes for b in blocks),
        bytes_per_param=bytes_per_param,
        encoder_slots=max(slots, default=None),
    )


def denoiser_blocks(pipe, max_block: int = _MAX_BLOCK) -> dict:
    """The denoiser's blocks by name, as :func:`model_facts` lists them (the units a plan keeps or streams)."""
    denoiser = denoiser_of(pipe)
    return dict(_blocks(denoiser, max_block)) if denoiser is not None else {}


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


def plan_level(plan: Plan) -> OptimizationLevel:
    """The fixed level closest to a plan, for display and for the OOM rescue's next step."""
    if plan.strategy == "resident":
        return OptimizationLevel.NONE
    if plan.strategy == "offload encoders and VAE":
        return OptimizationLevel.BALANCED
    return OptimizationLevel.ULTRA if plan.fp8 else OptimizationLevel.AGGRESSIVE


def _move_except(module, prefix: str, streamed: set[str], device, each_part=None) -> None:
    """Move ``module`` to ``device`` except the streamed sub-blocks (named by dotted path). With ``each_part``, the
    rest moves in parts of at most :data:`_MAX_BLOCK` bytes where the module tree allows (a larger module is split
    into its children), and ``each_part(nbytes)`` runs after each part with its bytes."""
    if prefix in streamed:
        return
    whole = not any(s.startswith(prefix + ".") or not prefix for s in streamed)
    if whole and (each_part is None or (prefix and module_bytes(module) <= _MAX_BLOCK)):
        module.to(device)
        if each_part is not None:
            each_part(module_bytes(module))
        return
    for name, param in module.named_parameters(recurse=False):
        param.data = param.data.to(device)
    for name, buf in module.named_buffers(recurse=False):
        module._buffers[name] = buf.to(device)
    for name, child in module.named_children():
        _move_except(child, f"{prefix}.{name}" if prefix else name, streamed, device, each_part)


class _GiveBackAsItMoves:
    """An ``each_part`` for :func:`_move_except`: gives back the pages of the mapped weight files read so far once
    ``step`` bytes have moved since the last time (reading this process's mappings costs a few milliseconds)."""

    def __init__(self, step: int = 64 * MiB) -> None:
        self.step, self.moved = step, 0

    def __call__(self, nbytes: int) -> None:
        self.moved += nbytes
        if self.moved >= self.step:
            release_mapped_weights()
            self.moved = 0


def _release_before(streamer, pipe) -> None:
    """Drop the denoiser's kept slots before the VAE decodes and before the encoders run, so that neither phase's
    peak holds them (the planner counts them in the denoising loop only). A VAE moved whole to the GPU drops them
    before its copy, which starts at ``decode``, ahead of its first module."""
    import torch

    vae = getattr(pipe, "vae", None)
    whole = getattr(vae, "_mlnb_whole", None)
    if whole is not None:
        whole.before_onload = streamer.release
    parts = [getattr(vae, name, None) for name in ("post_quant_conv", "decoder")] if vae is not None else []
    for module in parts + list(_text_encoders(pipe).values()):
        if isinstance(module, torch.nn.Module):
            module.register_forward_pre_hook(lambda module, args: streamer.release())


def apply_plan(pipe, plan: Plan, onload_device: str, use_stream: bool, ctx_device=None) -> OptimizationReport:
    """Place ``pipe`` as ``plan`` says; returns the eleven techniques applied or skipped.

    Args:
        pipe: a freshly loaded pipeline on the CPU.
        plan: from :func:`mlnb.plan.plan_for_budget`.
        onload_device: where compute runs (``"cuda:0"``; ``"cpu"`` exercises the same hooks in tests).
        use_stream: prefetch streamed blocks on a copy stream of ``ctx_device`` (CUDA only).
        ctx_device: the mlnb device for the after-load cleanup (default: the current one).
    """
    import torch

    ctx_device = ctx_device or get_device()
    copies = ctx_device.streams()  # how the streamed and offloaded weights reach the GPU
    results: dict[Technique, TechniqueResult] = {}
    denoiser = denoiser_of(pipe)
    level = plan_level(plan)

    if plan.fp8:
        store_fp8(denoiser)
        results[Technique.FP8_STORAGE] = applied(Technique.FP8_STORAGE, "denoiser weights stored as fp8 (needed to fit or faster)", "fp8 storage")
    vae = getattr(pipe, "vae", None)
    if plan.vae_tile and vae is not None and hasattr(vae, "tile_sample_min_size"):
        set_vae_tiles(vae, plan.vae_tile)
        results[Technique.VAE_TILING] = applied(Technique.VAE_TILING, f"decode in {plan.vae_tile} px tiles (needed to fit)", f"VAE tiles {plan.vae_tile}")

    device = torch.device(onload_device)
    streamed = set(plan.streamed)
    # The pages of the mapped weight files go back as the kept part moves, every 64 MiB: reading the whole kept part
    # first would hold all of it on the host at once.
    _move_except(denoiser, "", streamed, device, each_part=_GiveBackAsItMoves())
    gc.collect()
    give_back_host_memory()  # the kept part's host copy is gone: give it back before anything is pinned
    if plan.offload_encoders_vae:
        # Each text encoder is streamed unit by unit like the denoiser (pinned, prefetched, never whole on the GPU,
        # nothing copied back). The VAE goes to the GPU whole when it decodes, from one pinned region in one copy
        # (:class:`.streaming.WholeModel`), and leaves when the next image's first model (an encoder, or the
        # denoiser) starts. One that decodes in fp32 (SDXL's fp16 VAE on a card without bf16) is cast there, on
        # the GPU: the pipeline's own cast would run on the host before the decode.
        vae_off = None
        upcast = vae is not None and vae_needs_upcast(pipe)
        if vae is not None:  # one pinned region, copied whole at decode, nothing copied back
            if upcast:
                vae._mlnb_upcast_on_gpu = True
                vae.register_to_config(force_upcast=False)  # the pipeline leaves the cast to the onload
                cast_at_the_vae_s_edges(vae)  # fp16 latents into an fp32 decoder
            vae_off = pin_whole(vae, device, copies, copies.host_buffer,
                                compute_dtype=torch.float32 if upcast else None).offload
        encoders = list(_text_encoders(pipe).values())
        for encoder in encoders:
            units = [name for name, _ in _units(encoder, _MAX_BLOCK)]
            _move_except(encoder, "", set(units), device)
            stream_units(encoder, units, device, copies, copies.copy_stream() if use_stream else None,
                         copies.host_buffer)
        give_back_host_memory()  # the encoders' pageable originals, replaced by packed pinned copies
        if vae_off is not None:
            def vae_leaves(module, args):
                vae_off()

            for model in encoders + [denoiser]:  # an encoder may be skipped (prompt embeddings given)
                model.register_forward_pre_hook(vae_leaves)
        results[Technique.MODEL_CPU_OFFLOAD] = applied(
            Technique.MODEL_CPU_OFFLOAD,
            "text encoders streamed unit by unit and the VAE moved whole from pinned memory"
            f"{' (cast to fp32 on the GPU)' if upcast else ''}, each on the GPU only while it runs",
            "encoders+VAE offload",
        )
    else:
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module) and module is not denoiser:
                _move_except(module, "", set(), device, each_part=_GiveBackAsItMoves())

    if streamed:
        streamer = stream_units(
            denoiser, plan.streamed, device, copies, copies.copy_stream() if use_stream else None,
            copies.host_buffer, keep_slots=True, slots=plan.slots,
        )
        _release_before(streamer, pipe)
        give_back_host_memory()  # the pageable originals the packed pinned copies replaced
        prefetched = streamer.stream is not None
        moved = plan.streamed_bytes
        how = f" from pinned memory, each prefetched on a copy stream through {plan.slots} slots" if prefetched else (
            ", each copied in order")
        results[Technique.GROUP_OFFLOAD] = applied(
            Technique.GROUP_OFFLOAD,
            f"{len(plan.streamed)} denoiser blocks ({format_bytes(moved)}) streamed{how}"
            f"; {len(plan.resident)} blocks resident",
            f"stream {format_bytes(moved)}{' prefetched' if prefetched else ''}, keep {len(plan.resident)} blocks",
        )

    steps = cleanup(ctx_device, collect=True, empty_cache=True)
    results[Technique.GC_COLLECT] = applied(
        Technique.GC_COLLECT, "ran after load; runs again on error and after a generation that left GPU memory held"
    )
    if "cuda_cache_clear" in steps:
        results[Technique.CUDA_CACHE_CLEAR] = applied(
            Technique.CUDA_CACHE_CLEAR, "ran after load; runs again after each generation"
        )
    for tech in Technique:
        if tech not in results:
            results[tech] = skipped(tech, f"not needed by the {plan.strategy} plan for {format_bytes(plan.budget)}")
    pipe._mlnb_optimized = f"plan {format_bytes(plan.budget)}"
    return OptimizationReport(level, tuple(results[t] for t in Technique))
