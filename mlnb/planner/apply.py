"""Applying a budget :class:`~mlnb.planner.cost.Plan` to a pipeline: resident blocks on the GPU, the rest streamed.

The pieces are hooks in diffusers' and accelerate's hook systems: one on each streamed denoiser block and on each
unit of an offloaded text encoder (:mod:`.streaming`: pinned memory, a GPU ring of two of the largest unit, or three
for the denoiser where the plan says, each unit's copy issued on a copy stream as soon as its bytes in the ring are
free), so only streamed weights are pinned;
for the VAE, an accelerate hook that copies it whole from one pinned region (cast to fp32 on the GPU when it decodes
in fp32), which its ``decode`` triggers through diffusers' ``apply_forward_hook`` and which leaves the GPU when the
next image's encoders or denoiser start; ``enable_layerwise_casting`` for fp8 storage. Everything else of the
denoiser is moved to the GPU part by part, never whole, so a card smaller than the denoiser never holds it all at
once. The kept blocks a plan sends to the host for each decode (:mod:`.decode_room`) are packed into pinned memory
first and copied from there.

Order matters for host RAM: the kept part goes to the GPU first, a part of at most :data:`MOVE_PART` bytes at a
time, the pages of the mapped weight files it read handed back to the OS every 64 MiB moved (a copy to the card
reads them all, and the pages of a file stay resident until its last tensor has moved:
``scripts/host_ram_standin.py`` measures it), and only then are the streamed blocks and encoders pinned, packed
into power-of-two buffers one buffer at a time (:mod:`.pinning`: torch rounds each pinned block up to a power of
two), each pageable original released as soon as it is copied. The process never holds the whole model twice, and
pinned memory is the streamed bytes, not up to twice them.

A model read from its files in another dtype than it is stored in (:mod:`.deferred`) is cast on the way, part by
part: a kept part straight from the mapping to the GPU, a streamed unit, an encoder or the VAE into host memory just
before it is packed into its pinned region. What is pinned is what is copied to the GPU again at every step or image
(the streamed units, the encoders, the VAE); the kept part leaves no host copy. The parts a plan leaves in the weight
files' mapping because the host RAM cannot hold their pinned copies (``Plan.mapped_units``, ``Plan.mapped_models``)
get none either: they are not read at load, and each copy to the GPU reads them from the mapping, cast on the way,
its pages given back after it (:class:`.packed.MappedUnit`).
"""

from __future__ import annotations

import gc
import logging

from ..device import get_device
from ..levels import OptimizationLevel, Technique
from ..monitor import cleanup
from ..optimizer.context import applied, denoiser_of, skipped
from ..optimizer.offload import vae_needs_upcast
from ..optimizer.precision import store_fp8
from ..optimizer.report import OptimizationReport, TechniqueResult
from ..optimizer.vae import cast_at_the_vae_s_edges, set_vae_tiles
from ..optimizer.weights import module_bytes
from ..units import MiB, format_bytes
from .blocks import model_units, text_encoders
from .cost import Plan
from .decode_room import make_decode_room
from .deferred import defer, materialize
from .host_memory import GiveBackEvery, give_back_host_memory
from .packed import is_mapped
from .streaming import module_streamer, pin_whole, stream_units

logger = logging.getLogger(__name__)

__all__ = ["apply_plan", "plan_level", "MOVE_PART"]

MOVE_PART = 256 * MiB  # the kept part moves to the GPU in parts of at most this many bytes where the tree allows


def plan_level(plan: Plan) -> OptimizationLevel:
    """The fixed level closest to a plan, for display and for the OOM rescue's next step."""
    if plan.strategy == "resident":
        return OptimizationLevel.NONE
    if plan.strategy == "offload encoders and VAE":
        return OptimizationLevel.BALANCED
    return OptimizationLevel.ULTRA if plan.fp8 else OptimizationLevel.AGGRESSIVE


def _move_except(module, prefix: str, streamed: set[str], device, each_part=None) -> None:
    """Move ``module`` to ``device`` except the streamed sub-blocks (named by dotted path). With ``each_part``, the
    rest moves in parts of at most :data:`MOVE_PART` bytes where the module tree allows (a larger module is split
    into its children), and ``each_part(nbytes)`` runs after each part with its bytes. A tensor still deferred
    (:mod:`.deferred`) is cast from its mapped source on the way."""
    if prefix in streamed:
        return
    whole = not any(s.startswith(prefix + ".") or not prefix for s in streamed)
    if whole and (each_part is None or (prefix and module_bytes(module) <= MOVE_PART)):
        cast = materialize(module, device)  # read in another dtype: cast on the way, tensor by tensor
        module.to(device)
        if each_part is not None:
            each_part(module_bytes(module) + cast)
        return
    materialize(module, device, recurse=False)
    for name, param in module.named_parameters(recurse=False):
        param.data = param.data.to(device)
    for name, buf in module.named_buffers(recurse=False):
        module._buffers[name] = buf.to(device)
    for name, child in module.named_children():
        _move_except(child, f"{prefix}.{name}" if prefix else name, streamed, device, each_part)


def _on_host(module, mapped=()) -> None:
    """Cast what is still deferred of ``module`` into host memory (the parts about to be packed into pinned regions),
    giving the mapped pages read back every 64 MiB; the units named in ``mapped`` (dotted paths), and any module
    streamed from the mapping already, stay there (cast as they are copied)."""
    each = GiveBackEvery()

    def walk(sub, prefix: str) -> None:
        if prefix in mapped or is_mapped(sub):
            return
        materialize(sub, "cpu", recurse=False, each_part=each)
        for name, child in sub.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name)

    if mapped or any(is_mapped(sub) for sub in module.modules()):
        walk(module, "")
    else:
        materialize(module, "cpu", each_part=each)


def _release_before(streamer, pipe) -> None:
    """Drop the denoiser's kept ring before the VAE decodes and before the encoders run, so that neither phase's
    peak holds it (the planner counts it in the denoising loop only). A VAE moved whole to the GPU drops it
    before its copy, which starts at ``decode``, ahead of its first module."""
    import torch

    denoiser = denoiser_of(pipe)

    def release(*_) -> None:  # the denoiser's streamer now: changing LoRAs streams its units anew
        current = module_streamer(denoiser) or streamer
        current.release()

    vae = getattr(pipe, "vae", None)
    whole = getattr(vae, "_mlnb_whole", None)
    if whole is not None:
        whole.before_onload = release
    parts = [getattr(vae, name, None) for name in ("post_quant_conv", "decoder")] if vae is not None else []
    for module in parts + list(text_encoders(pipe).values()):
        if isinstance(module, torch.nn.Module):
            module.register_forward_pre_hook(release)


def apply_plan(pipe, plan: Plan, onload_device: str, use_stream: bool, ctx_device=None) -> OptimizationReport:
    """Place ``pipe`` as ``plan`` says; returns the eleven techniques applied or skipped.

    Args:
        pipe: a freshly loaded pipeline on the CPU.
        plan: from :func:`mlnb.planner.search.plan_for_budget`.
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
        # Every weight left in the mapping first: layerwise casting then casts placeholders, and each weight is cast
        # to fp8 as it is placed (on the GPU, or into its pinned copy), not the whole denoiser on the host at once.
        defer(denoiser, lambda _, tensor: tensor.dtype, same=True)
        store_fp8(denoiser)
        results[Technique.FP8_STORAGE] = applied(
            Technique.FP8_STORAGE, "denoiser weights stored as fp8 (needed to fit or faster)", "fp8 storage"
        )
    vae = getattr(pipe, "vae", None)
    if plan.vae_tile and vae is not None and hasattr(vae, "tile_sample_min_size"):
        set_vae_tiles(vae, plan.vae_tile)
        results[Technique.VAE_TILING] = applied(
            Technique.VAE_TILING, f"decode in {plan.vae_tile} px tiles (needed to fit)", f"VAE tiles {plan.vae_tile}"
        )

    device = torch.device(onload_device)
    streamed = set(plan.streamed)
    # The pages of the mapped weight files go back as the kept part moves, every 64 MiB: reading the whole kept part
    # first would hold all of it on the host at once. The kept blocks that leave for the decode stay on the host
    # for now: they are pinned after the streamed units and reach the GPU as the decode room places them.
    _move_except(denoiser, "", streamed | set(plan.decode_offload), device, each_part=GiveBackEvery())
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
            vae_mapped = "vae" in plan.mapped_models
            if not vae_mapped:
                _on_host(vae)
            vae_off = pin_whole(vae, device, copies, copies.host_buffer,
                                compute_dtype=torch.float32 if upcast else None, mapped=vae_mapped).offload
        encoders = list(text_encoders(pipe).values())
        for name, encoder in text_encoders(pipe).items():
            units = [unit for unit, _ in model_units(encoder)]
            _move_except(encoder, "", set(units), device)
            mapped = units if name in plan.mapped_models else ()
            if not mapped:
                _on_host(encoder)  # its units, packed next
            stream_units(encoder, units, device, copies, copies.copy_stream() if use_stream else None,
                         copies.host_buffer, mapped=mapped)
        give_back_host_memory()  # the encoders' pageable originals, replaced by packed pinned copies
        if vae_off is not None:
            def vae_leaves(module, args):
                vae_off()

            for model in encoders + [denoiser]:  # an encoder may be skipped (prompt embeddings given)
                model.register_forward_pre_hook(vae_leaves)
        results[Technique.MODEL_CPU_OFFLOAD] = applied(
            Technique.MODEL_CPU_OFFLOAD,
            "text encoders streamed unit by unit and the VAE moved whole from pinned memory"
            f"{' (cast to fp32 on the GPU)' if upcast else ''}, each on the GPU only while it runs"
            + (f"; {', '.join(plan.mapped_models)} copied from the weight files' mapping instead (the host RAM "
               "cannot hold their pinned copies)" if plan.mapped_models else "")
            + (f"; {len(plan.decode_offload)} kept denoiser blocks ({format_bytes(plan.decode_offload_bytes)}) go "
               "to their pinned host copy for each decode" if plan.decode_offload else ""),
            "encoders+VAE offload" + (", kept blocks out for the decode" if plan.decode_offload else ""),
        )
    else:
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module) and module is not denoiser:
                _move_except(module, "", set(), device, each_part=GiveBackEvery())

    if streamed:
        _on_host(denoiser, plan.mapped_units)  # the streamed units to pin, packed next
        streamer = stream_units(
            denoiser, plan.streamed, device, copies, copies.copy_stream() if use_stream else None,
            copies.host_buffer, keep_slots=True, slots=plan.slots, mapped=plan.mapped_units, split=plan.split_units,
        )
        _release_before(streamer, pipe)
        give_back_host_memory()  # the pageable originals the packed pinned copies replaced
        prefetched = streamer.stream is not None
        moved = plan.streamed_bytes
        how = f" from pinned memory, each prefetched on a copy stream through {plan.slots} slots" if prefetched else (
            ", each copied in order")
        left = (f" ({len(plan.mapped_units)} of them from the weight files' mapping: the pinned copies would not fit "
                f"the host RAM)" if plan.mapped_units else "")
        results[Technique.GROUP_OFFLOAD] = applied(
            Technique.GROUP_OFFLOAD,
            f"{len(plan.streamed)} denoiser blocks ({format_bytes(moved)}) streamed{how}{left}"
            f"; {len(plan.resident)} blocks resident",
            f"stream {format_bytes(moved)}{' prefetched' if prefetched else ''}, keep {len(plan.resident)} blocks",
        )

    if plan.decode_offload:
        _on_host(denoiser)  # the blocks that leave for the decode, packed next
        # After the streamer's and the VAE's hooks, so that the VAE leaves before the blocks come back.
        models = list(text_encoders(pipe).values()) + [denoiser]
        make_decode_room(denoiser, plan.decode_offload, device, copies, copies.copy_stream() if use_stream else None,
                         copies.host_buffer, vae=vae, models=models)
        give_back_host_memory()

    for module in pipe.components.values():  # any other model stays on the host, cast as the plan's dtype says
        if isinstance(module, torch.nn.Module):
            _on_host(module)
    steps = cleanup(ctx_device, collect=True, empty_cache=True)
    results[Technique.GC_COLLECT] = applied(
        Technique.GC_COLLECT, "ran after load; runs again on error, and once idle after generations that left GPU memory held"
    )
    if "cuda_cache_clear" in steps:
        results[Technique.CUDA_CACHE_CLEAR] = applied(
            Technique.CUDA_CACHE_CLEAR, "ran after load; runs again once idle after generations"
        )
    for tech in Technique:
        if tech not in results:
            results[tech] = skipped(tech, f"not needed by the {plan.strategy} plan for {format_bytes(plan.budget)}")
    pipe._mlnb_optimized = f"plan {format_bytes(plan.budget)}"
    return OptimizationReport(level, tuple(results[t] for t in Technique))
