"""The OOM rescue: on a GPU out-of-memory error, free everything and retry once at the next stronger level.

When other cached models hold GPU memory, they are unloaded first and the same pipeline tries once more
(:mod:`.room`); only when that runs out of memory too does it move to a stronger level.

A pipeline placed by a budget plan retries with a safer plan instead: the same budget less a quarter, so more of the
denoiser is streamed and the margin grows; when no plan fits that, at ``ultra``.
"""

from __future__ import annotations

import dataclasses
import logging

from ..device import Device
from ..errors import InvalidArgumentError, OutOfMemoryRescueError
from ..levels import OptimizationLevel, stronger_level
from ..monitor import cleanup, release_exception_frames
from ..units import format_bytes
from . import room
from .managed import ManagedPipeline, load_pipeline, remember
from .result import GenerationResult

logger = logging.getLogger(__name__)

__all__ = ["generate_with_rescue", "SAFER_PLAN_FACTOR"]

SAFER_PLAN_FACTOR = 0.75  # a plan that ran out of memory is retried with this share of its budget


def _fits_hint(width: int, height: int, num_images: int, device: Device) -> str:
    if num_images > 1:
        return f"try --num-images {max(1, num_images // 2)}"
    w, h = max(64, int(width * 0.75) // 64 * 64), max(64, int(height * 0.75) // 64 * 64)
    if w * h < width * height:
        return f"try a smaller size such as --width {w} --height {h}"
    # Already at the smallest size worth suggesting: the memory is held by something else.
    return (
        f"even {width}×{height} does not fit in the {format_bytes(device.free_bytes())} free: "
        "%vram who shows what holds GPU memory, %vram free releases it"
    )


def generate_with_rescue(managed: ManagedPipeline, **generate_kwargs) -> GenerationResult:
    """Generate; on a GPU out-of-memory error free everything and retry: first the same pipeline, once other models
    holding GPU memory are unloaded (when there are any), then once at the next stronger level (a safer plan).
    A pipeline unloaded to make room for another model since it was loaded (the dashboard's thread beside a cell)
    is loaded again first.

    Raises:
        OutOfMemoryRescueError: still out of memory at ultra (or after the retry), with what would fit.
    """
    if not managed.loaded and managed.unloaded_for:  # made room for another model since it was handed out
        logger.warning("%s was unloaded to make room for %s; loading it again", managed.model, managed.unloaded_for)
        managed = _load_again(managed)
    device = managed.device
    result, first_error = _generate_unless_oom(managed, generate_kwargs)
    if result is not None:
        return result
    beside = room.holders(device, besides=managed.model)
    if beside:  # other models' weights first: the same pipeline may fit once they are gone
        unloaded = []
        for other, held in beside:
            why = (f"out of memory ({first_error}) with {other.model} beside it ({format_bytes(held)} on the GPU): "
                   "unloading it and retrying")
            if room.unload_for(other, managed.model, why):
                unloaded.append(other.model)
        result, _ = _generate_unless_oom(managed, generate_kwargs) if unloaded else (None, "")
        if result is not None:
            them = "it" if len(unloaded) == 1 else "them"
            result = dataclasses.replace(result, notes=(f"out of memory with {', '.join(unloaded)} loaded: unloaded {them}",))
            remember(result)
            return result
    width = generate_kwargs.get("width") or managed.default_size()[0]
    height = generate_kwargs.get("height") or managed.default_size()[1]
    num_images = generate_kwargs.get("num_images", 1)
    hint = _fits_hint(width, height, num_images, device)
    rescued_from = managed.level
    if managed.plan is not None:
        retry, tried, again = _safer_plan(managed, first_error)
    else:
        stronger = stronger_level(managed.level)
        if stronger is None:
            raise OutOfMemoryRescueError(
                f"out of GPU memory at level ultra for {width}×{height} ×{num_images}; {hint}"
            ) from None
        logger.warning("out of memory at level %s (%s); retrying at %s", managed.level.value, first_error, stronger.value)
        retry = load_pipeline(
            managed.model, level=stronger, dtype=managed.dtype, device=device,
            **managed.load_kwargs,
        )
        tried, again = f"level {rescued_from.value}", stronger.value
    note = f"out of memory {_at(tried)}" if managed.plan is not None else f"out of memory at {rescued_from.value}"
    result, _ = _generate_unless_oom(retry, generate_kwargs)
    if result is None:
        raise OutOfMemoryRescueError(
            f"out of GPU memory {_at(tried)} and again {_at(again)} for {width}×{height} ×{num_images}; {hint}"
        ) from None
    result = dataclasses.replace(result, rescued_from=rescued_from, notes=(note,))
    remember(result)
    return result


def _load_again(managed: ManagedPipeline) -> ManagedPipeline:
    """``managed``'s pipeline loaded again as it was asked for: auto, the same budget, or the same level and config."""
    kwargs = dict(dtype=managed.dtype, device=managed.device, **managed.load_kwargs)
    if managed.choice.auto:
        return load_pipeline(managed.model, level="auto", **kwargs)
    if managed.plan is not None:
        return load_pipeline(managed.model, budget=managed.plan.budget, **kwargs)
    return load_pipeline(managed.model, config=managed.config, **kwargs)


def _generate_unless_oom(managed: ManagedPipeline, generate_kwargs: dict) -> tuple[GenerationResult | None, str]:
    """``(result, "")``, or ``(None, the error's type name)`` when the GPU ran out of memory: the error's frames
    released and the memory cleaned up. Any other error propagates."""
    try:
        return managed.generate(**generate_kwargs), ""
    except BaseException as exc:
        if not managed.device.is_oom(exc):
            raise
        release_exception_frames(exc)
        error = type(exc).__name__
    cleanup(managed.device)
    return None, error


def _at(what: str) -> str:
    return f"with the {what}" if what.startswith("plan") else f"at {what}"


def _safer_plan(managed: ManagedPipeline, first_error: str) -> tuple[ManagedPipeline, str, str]:
    """Reload ``managed`` with a plan for a quarter less budget, or at ultra when none fits that."""
    budget = managed.plan.budget
    safer = int(budget * SAFER_PLAN_FACTOR)
    tried = f"plan for {format_bytes(budget)}"
    kwargs = dict(dtype=managed.dtype, device=managed.device, **managed.load_kwargs)
    try:
        retry = load_pipeline(managed.model, budget=safer, **kwargs)
        again = f"plan for {format_bytes(safer)}"
    except InvalidArgumentError:  # nothing fits the smaller budget: stream everything
        retry = load_pipeline(managed.model, level=OptimizationLevel.ULTRA, **kwargs)
        again = "ultra"
    logger.warning("out of memory with the %s (%s); retrying with the %s", tried, first_error, again)
    return retry, tried, again
