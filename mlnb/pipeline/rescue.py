"""The OOM rescue: on a GPU out-of-memory error, free everything and retry once at the next stronger level.

When other cached models hold GPU memory, they are unloaded first and the same pipeline tries once more
(:mod:`.cache`); only when that runs out of memory too does it move to a stronger level.

A pipeline placed by a budget plan retries with a safer plan instead: the same budget less a quarter, so more of the
denoiser is streamed and the margin grows; when no plan fits that, at ``ultra``.
"""

from __future__ import annotations

import logging

from ..device import Device
from ..errors import InvalidArgumentError, OutOfMemoryRescueError
from ..levels import OptimizationLevel, stronger_level
from ..monitor import cleanup, release_exception_frames
from ..setting import MemorySetting
from ..units import format_bytes
from . import cache
from .loading import load
from .managed import ManagedPipeline
from .result import GenerationResult
from .validation import GenerationArgs, check_progress

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


def generate_with_rescue(managed: ManagedPipeline, args: GenerationArgs | None = None, progress=None,
                         **generate_kwargs) -> GenerationResult:
    """Generate; on a GPU out-of-memory error free everything and retry: first the same pipeline, once other models
    holding GPU memory are unloaded (when there are any), then once at the next stronger level (a safer plan).
    A pipeline unloaded to make room for another model since it was loaded (the dashboard's thread beside a cell)
    is loaded again first.

    Args:
        managed: the pipeline to generate with.
        args: what to generate, checked (:meth:`GenerationArgs.checked`); or give
            :meth:`~mlnb.ManagedPipeline.generate`'s keyword arguments instead (``prompt=...``, ``steps=...``).
        progress: called as ``progress(step, total)`` after each denoising step.

    Raises:
        OutOfMemoryRescueError: still out of memory at ultra (or after the retry), with what would fit.

    Example:
        ```python
        >>> result = generate_with_rescue(mlnb.load_pipeline(folder, level="none"), prompt="a fox", steps=20)
        >>> result.rescued_from, result.notes
        ```
    """
    if args is None:
        args = GenerationArgs.checked(**generate_kwargs)
    elif generate_kwargs:
        raise InvalidArgumentError(f"{sorted(generate_kwargs)[0]}= beside args: give the arguments one way")
    check_progress(progress)
    if not managed.loaded and managed.unloaded_for:  # made room for another model since it was handed out
        logger.warning("%s was unloaded to make room for %s; loading it again", managed.model, managed.unloaded_for)
        managed = _load_again(managed)
    device = managed.device
    result, first_error = _generate_unless_oom(managed, args, progress)
    if result is not None:
        return result
    beside = cache.holders(device, besides=managed.model)
    if beside:  # other models' weights first: the same pipeline may fit once they are gone
        unloaded = []
        for other, held in beside:
            why = (f"out of memory ({first_error}) with {other.model} beside it ({format_bytes(held)} on the GPU): "
                   "unloading it and retrying")
            if cache.unload_for(other, managed.model, why):
                unloaded.append(other.model)
        if unloaded:
            them = "it" if len(unloaded) == 1 else "them"
            note = f"out of memory with {', '.join(unloaded)} loaded: unloaded {them}"
            result, _ = _generate_unless_oom(managed, args, progress, notes=(note,))
            if result is not None:
                return result
    width = args.width or managed.default_size()[0]
    height = args.height or managed.default_size()[1]
    hint = _fits_hint(width, height, args.num_images, device)
    rescued_from = managed.level
    if managed.plan is not None:
        retry, tried, again = _safer_plan(managed, first_error)
        note = f"out of memory {_at(tried)}"
    else:
        stronger = stronger_level(managed.level)
        if stronger is None:
            raise OutOfMemoryRescueError(
                f"out of GPU memory at level ultra for {width}×{height} ×{args.num_images}; {hint}"
            ) from None
        logger.warning("out of memory at level %s (%s); retrying at %s", managed.level.value, first_error, stronger.value)
        retry = _with_loras(load(managed.model, MemorySetting.of_level(stronger), dtype=managed.dtype,
                                 device=device, **managed.load_kwargs), managed)
        tried, again = f"level {rescued_from.value}", stronger.value
        note = f"out of memory at {rescued_from.value}"
    result, _ = _generate_unless_oom(retry, args, progress, rescued_from=rescued_from, notes=(note,))
    if result is None:
        raise OutOfMemoryRescueError(
            f"out of GPU memory {_at(tried)} and again {_at(again)} for {width}×{height} ×{args.num_images}; {hint}"
        ) from None
    return result


def _load_again(managed: ManagedPipeline) -> ManagedPipeline:
    """``managed``'s pipeline loaded again as it was asked for: auto, the same budget, or the same level or config,
    with its LoRAs."""
    return _with_loras(load(managed.model, managed.setting, dtype=managed.dtype, device=managed.device,
                            **managed.load_kwargs), managed)


def _with_loras(retry: ManagedPipeline, managed: ManagedPipeline) -> ManagedPipeline:
    """``retry`` with the LoRAs ``managed`` generated with: a retry makes the image that was asked for."""
    if retry is not managed and (managed.lora_specs or retry.lora_specs):
        retry.set_loras(managed.lora_specs, allow_pickle=managed.loras_allow_pickle)
    return retry


def _generate_unless_oom(managed: ManagedPipeline, args: GenerationArgs, progress, **rescue) -> tuple[
        GenerationResult | None, str]:
    """``(result, "")``, or ``(None, the error's type name)`` when the GPU ran out of memory: the error's frames
    released and the memory cleaned up. Any other error propagates. ``rescue``: what the result says of the
    rescue (``rescued_from``, ``notes``)."""
    try:
        return managed.run(args, progress, **rescue), ""
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
    safer = MemorySetting(budget=int(budget * SAFER_PLAN_FACTOR))
    tried = f"plan for {managed.setting.show_budget(budget)}"
    kwargs = dict(dtype=managed.dtype, device=managed.device, **managed.load_kwargs)
    try:
        retry = load(managed.model, safer, **kwargs)
        again = f"plan for {safer}"
    except InvalidArgumentError:  # nothing fits the smaller budget: stream everything
        retry = load(managed.model, MemorySetting.of_level(OptimizationLevel.ULTRA), **kwargs)
        again = "ultra"
    logger.warning("out of memory with the %s (%s); retrying with the %s", tried, first_error, again)
    return _with_loras(retry, managed), tried, again
