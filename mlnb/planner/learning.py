"""What generations teach the planner about a card, and the predictions it makes from that.

Each function takes a :class:`LearningContext`: the few things of a loaded pipeline that learning reads (its device,
model key, plan and the facts behind it, the techniques applied, the diffusers pipeline). After each generation on a
CUDA card, :func:`record` caches the card's measurements for that model (:mod:`mlnb.planner.cards`): a step's time
and its block timeline, the host's time to issue a forward (resident, and per streamed unit beyond that), the
decode, the activations, what a streamed step took beyond the time model's two chains, and a plan's time besides
its steps. Before a generation, :func:`predict` gives the plan's peak and time from what is
cached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..levels import Technique
from ..optimizer.context import denoiser_of
from ..units import MiB, format_bytes
from .blocks import denoiser_blocks
from .cards import card_facts, record_measured
from .cost import TILES, ModelFacts, Plan, Workload, streamed_denoise_reserve, streamed_step
from .cost import predict as predict_plan
from .streaming import streamer_of
from .timing import BlockTimer, StepTimer, cache_was_empty

if TYPE_CHECKING:
    from ..device import Device
    from ..optimizer import OptimizationReport

logger = logging.getLogger(__name__)

__all__ = ["LearningContext", "predict", "resident", "block_timer", "record", "room_for_the_allocator"]


@dataclass(frozen=True)
class LearningContext:
    """What learning reads of one loaded pipeline, as it is for one generation.

    Args:
        device: the card it runs on; measurements are recorded on a CUDA card only.
        model_key: the key its measurements are cached under (:func:`mlnb.planner.blocks.model_key`), or None for a
            pipeline without a denoiser (nothing to learn).
        pipe: the diffusers pipeline, whose denoiser blocks are timed and whose streamer's slots are counted.
        plan: the plan it was placed by, or None for a fixed level.
        facts: the model facts the plan was made from (before fp8 storage), or None.
        techniques: the techniques applied (what :func:`resident` reads of a pipeline without a plan).
    """

    device: Device
    model_key: str | None
    pipe: Any
    plan: Plan | None = None
    facts: ModelFacts | None = None
    techniques: OptimizationReport | None = None

    @property
    def learns(self) -> bool:
        """Whether a generation here can teach the card facts anything (a CUDA card and a model to key them by)."""
        return self.device.is_cuda and self.model_key is not None


def predict(context: LearningContext, work: Workload) -> tuple[int | None, float | None]:
    """The plan's predicted peak bytes and seconds for ``work``; ``(None, None)`` without a plan.

    The card facts are the ones known now, so a step time measured since loading improves the prediction.
    """
    if context.plan is None or context.facts is None:
        return None, None
    card = card_facts(context.device, context.model_key, work, measure=False)
    return predict_plan(context.plan, context.facts, card, work)


def resident(context: LearningContext) -> tuple[bool, bool]:
    """(the denoiser stays whole on the GPU in fp16/bf16, and so do the text encoders and the VAE, which decodes
    untiled): the first makes a step's time compute alone; the second makes the decode time and the activation
    bytes above the weights mean what the planner takes them for."""
    plan = context.plan
    if plan is not None:
        whole = not plan.streamed and not plan.fp8
        return whole, whole and not plan.vae_tile and not plan.offload_encoders_vae
    applied = {r.technique for r in context.techniques.applied} if context.techniques is not None else set()
    moving = {Technique.SEQUENTIAL_CPU_OFFLOAD, Technique.GROUP_OFFLOAD, Technique.FP8_STORAGE}
    vae_moving = {Technique.MODEL_CPU_OFFLOAD, Technique.VAE_TILING, Technique.VAE_SLICING}
    whole = not applied & moving
    return whole, whole and not applied & vae_moving


def room_for_the_allocator(context: LearningContext, work: Workload, timer: StepTimer, during: dict[str, int]) -> None:
    """After a planned generation in whose steps (after the first) the caching allocator had to free cached
    memory (retries, device frees: each synchronizes the device), cache a larger fragmentation margin for this
    model on the card, so that the next plan made for it leaves the allocator more room: 1.5 times the room this
    plan left between the loop's peak allocated bytes and the budget."""
    freed = during.get("num_alloc_retries", 0) + during.get("num_device_free", 0)
    plan = context.plan
    if not freed or plan is None or timer.denoise_peak is None or context.model_key is None:
        return
    left = max(0, plan.budget - timer.denoise_peak)
    known = card_facts(context.device, context.model_key, work, measure=False).fragmentation_reserve or 0
    margin = max(known, int(1.5 * left), 64 * MiB)
    if margin == known:
        return  # raised before for this plan: the next plan already leaves it
    record_measured(context.device, context.model_key, work, fragmentation_reserve=margin)
    logger.warning(
        "the allocator freed cached memory %d time(s) during the steps under the %s plan (%s left beside the "
        "loop's peak); the next plan for this model on this card leaves %s", freed, format_bytes(plan.budget),
        format_bytes(left), format_bytes(margin),
    )


def _streams_its_denoiser(context: LearningContext) -> bool:
    """A plan streams part of the denoiser in its own dtype (a step's waits for copies can be taken out)."""
    return context.plan is not None and bool(context.plan.streamed) and not context.plan.fp8


def block_timer(context: LearningContext, work: Workload):
    """A :class:`BlockTimer` of the denoiser on CUDA: its blocks' timeline where that is something to learn (the
    denoiser is resident: each resident generation records its timeline; or streamed by a plan in its own dtype on
    a card that has no resident step of the model yet: the streamed timeline, its waits for copies taken out, stands
    in until then), else the host's time to issue each forward alone (a streamed plan's, for its host time per
    unit); a context that does nothing where neither is learnt (fp8 storage, a fixed level's offloading)."""
    if not context.learns:
        return contextlib.nullcontext()
    denoiser = denoiser_of(context.pipe)
    streamed = _streams_its_denoiser(context)
    if streamed:
        if card_facts(context.device, context.model_key, work, measure=False).step_seconds is not None:
            # a resident step is known: the streamed timeline would not be used, the host time per unit would
            return BlockTimer(context.device, denoiser, None)
    elif not resident(context)[0]:
        return contextlib.nullcontext()
    if context.facts is not None:  # the plan's blocks, which its timeline must name
        modules = dict(denoiser.named_modules())
        blocks = {b.name: modules[b.name] for b in context.facts.blocks}
    else:
        blocks = denoiser_blocks(context.pipe)
    streamer = streamer_of(context.pipe) if streamed else None
    return BlockTimer(context.device, denoiser, blocks, streamer=streamer)


def _host_facts(card, plan: Plan, host: float | None) -> dict:
    """What a streamed generation's host time per forward (``host``) teaches: the host time per streamed unit
    beyond the resident forward's, or, where only that per-unit time is known (the model never ran resident here),
    the resident forward's."""
    if host is None or not plan.streamed:
        return {}
    units = len(plan.streamed)
    if card.host_forward_seconds is not None:
        return {"host_unit_seconds": max(0.0, host - card.host_forward_seconds) / units}
    if card.host_unit_seconds is not None:
        return {"host_forward_seconds": max(1e-5, host - units * card.host_unit_seconds)}
    return {}


def record(context: LearningContext, work: Workload, timer: StepTimer, report, seconds: float | None = None,
           blocks=None) -> None:
    """Cache this card's measurements for the planner: the step, its block timeline and the host's time to issue a
    forward, decode and activations when the denoiser (and, for the rest, everything) ran resident; for a streamed
    step, its host time per unit and what it took beyond the time model's two chains (and, until the model runs
    resident on the card, its compute with the waits for copies taken out, as the step and timeline); and, for a
    plan, its tiled (or, with kept blocks sent to the host for it, untiled) decode and the time besides its steps and
    decode out of ``seconds``, the call's time up to the end of its cleanup (what a prediction is for).

    Args:
        context: the pipeline that generated.
        work: what it generated (size, batch, steps).
        timer: the generation's step timer, finished.
        report: the generation's :class:`~mlnb.monitor.MemoryReport` (its start and peak bytes), or None.
        seconds: the call's seconds up to the end of its cleanup.
        blocks: the generation's :func:`block_timer`.
    """
    if not context.learns or timer.step_seconds is None:
        return
    device, key, plan = context.device, context.model_key, context.plan
    timed = blocks if isinstance(blocks, BlockTimer) else None
    measured: dict = {}
    if plan is not None:
        if plan.vae_tile in TILES and timer.decode_seconds:
            measured[f"decode_seconds_{plan.vae_tile}"] = timer.decode_seconds
        elif plan.decode_offload and plan.vae_tile is None and timer.decode_seconds:
            measured["decode_seconds"] = timer.decode_seconds  # untiled, in the precision the plan decodes in
        if seconds is not None:
            # the kept blocks' copy back is charged apart (plan.decode_offload_bytes), so "other" is the same for
            # every plan
            back = 0.0
            if plan.decode_offload:
                bandwidth = card_facts(device, key, work, measure=False).bandwidth
                back = plan.decode_offload_bytes / bandwidth if bandwidth else 0.0
            other = seconds - work.steps * timer.step_seconds - (timer.decode_seconds or 0.0) - back
            measured["other_offload_seconds" if plan.offload_encoders_vae else "other_seconds"] = max(other, 1e-5)
    denoiser, everything = resident(context)
    if not denoiser:
        if _streams_its_denoiser(context):
            card = card_facts(device, key, work, measure=False)
            timeline = timed.timeline() if timed is not None else None
            if card.step_seconds is None and timeline is not None:
                # The model has not run whole on this card (it may never fit): its compute, from this step
                # with the waits for copies taken out, stands in until it does.
                compute = timer.step_seconds - timed.stall_seconds
                measured.update(step_seconds=compute, block_timeline=timeline)
                card = dataclasses.replace(card, step_seconds=compute, block_timeline=timeline)
            host = _host_facts(card, plan, timed.host_forward_seconds if timed is not None else None)
            measured.update(host)
            card = dataclasses.replace(card, **host)
            streamer = streamer_of(context.pipe)
            if card.denoise_reserve is None and streamer is not None and report is not None \
                    and timer.denoise_peak is not None and report.start_allocated is not None:
                # Until the model runs resident here (one larger than the card never does), the loop's activations
                # as this streamed generation bounds them replace the anchors' larger figure.
                reserve = streamed_denoise_reserve(timer.denoise_peak, report.start_allocated,
                                                   streamer.slot_bytes * min(streamer.slot_count, len(streamer.units)),
                                                   work)
                if reserve is not None:
                    measured["denoise_reserve"] = reserve
            if context.facts is not None:  # what neither chain foresaw (the allocator, the copy engine's own pace)
                chains = streamed_step(plan, context.facts, dataclasses.replace(card, unit_overhead=0.0))
                if chains:
                    measured["unit_overhead"] = max(0.0, timer.step_seconds - chains) / len(plan.streamed)
    else:
        measured["step_seconds"] = timer.step_seconds
        clean = report is not None and cache_was_empty(report.start_allocated, report.start_reserved)
        if clean and timer.fragmentation:  # cached blocks at the start would count as fragmentation
            # never below a margin that a plan's steps showed the allocator needed
            known = card_facts(device, key, work, measure=False).fragmentation_reserve or 0
            measured["fragmentation_reserve"] = max(timer.fragmentation, known)
        if timed is not None:
            measured["block_timeline"] = timed.timeline()
            measured["host_forward_seconds"] = timed.host_forward_seconds
        if everything:
            denoise, decode = timer.reserves(report.start_allocated, report.peak_allocated)
            measured.update(decode_seconds=timer.decode_seconds, denoise_reserve=denoise, decode_reserve=decode)
    record_measured(device, key, work, **measured)
