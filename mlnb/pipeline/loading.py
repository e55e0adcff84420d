"""``load_pipeline``: read a model once, choose its level or plan for the memory setting, place it, and cache it.

A load answers from the cache when it can (the same model, dtype, setting and ``from_pretrained`` arguments); else
one load at a time reads the files, checks the pipeline can generate, chooses (a budget's plan; for ``auto`` on a CUDA
card the plan for the memory free now, elsewhere the level table; else the level or config), drops the model's other
cached copy, makes room on the GPU, and applies the techniques or the plan.
"""

from __future__ import annotations

import logging
import os
import threading

from ..device import Device, get_device
from ..errors import InvalidArgumentError, LoadInterrupted, OutOfMemoryRescueError
from ..levels import (
    LevelChoice, MemoryOptimizationConfig, OptimizationLevel, Technique, activation_reserve, choose_level,
    stronger_level,
)
from ..monitor import cleanup, release_exception_frames
from ..notices import plan_not_applied
from ..optimizer import MemoryOptimizer, OptimizationReport
from ..optimizer.context import skipped
from ..optimizer.offload import vae_needs_upcast
from ..optimizer.vae import decode_in_bf16
from ..optimizer.weights import weight_bytes
from ..planner import ModelFacts, Plan, Workload, apply, blocks, card_facts, native_size, room_needed, search
from ..redact import masked_kwargs
from ..setting import MemorySetting
from ..units import format_bytes
from . import cache, files
from .files import (
    check_local_weights, dtype_name, load_dtype, model_index, parameters_of, pipeline_parameters, reads_pickle,
    resolve_model,
)
from .loras import parse_loras
from .managed import ManagedPipeline
from .mapped import materialize_all, read_pipeline
from .result import plan_title
from .validation import FROM_PRETRAINED_KEYWORDS, check_load_keywords, text_to_image_parameters

logger = logging.getLogger(__name__)

__all__ = ["load_pipeline", "load"]

_loading = threading.RLock()  # one load reads and places a model at a time


def load_pipeline(
    model: str | os.PathLike,
    level: str = "auto",
    dtype=None,
    allow_pickle: bool = False,
    device: Device | None = None,
    config: MemoryOptimizationConfig | None = None,
    budget: int | str | None = None,
    loras=None,
    **from_pretrained_kwargs,
) -> ManagedPipeline:
    """Load a diffusers pipeline, fit it to GPU memory, and cache it by (model, dtype, memory setting).

    The LoRAs are not part of the cache key: the same model with other LoRAs is the cached pipeline with its adapter
    set changed (:meth:`ManagedPipeline.set_loras`), which reads no base weight again.

    Args:
        model: a hub id (``org/name``) or a local diffusers folder.
        level: ``"auto"`` (chosen from free VRAM and the model's size), ``"none"``, ``"balanced"``,
            ``"aggressive"`` or ``"ultra"``.
        dtype: ``"fp16"``, ``"bf16"``, ``"fp32"`` or a ``torch.dtype``; ``torch_dtype`` is taken as the same
            argument. Default: fp32 on a CPU; bf16 for SD3.5, Flux and other transformer pipelines on a card that
            computes bf16 in hardware (compute capability 8.0 and up); fp16 otherwise, a T4 included. bf16 given for
            a card that only emulates it is said once to be slow.
        allow_pickle: accept pickle weights, of the model and of its LoRAs. Off by default: pickle can run code
            when loaded.
        device: the device to use (default: the current device).
        config: explicit technique settings (overrides ``level``'s; a different ``level`` beside it is an error).
        budget: a VRAM budget (``"4GiB"``, ``"3.75 GiB"`` or bytes) instead of a level: the planner keeps what fits
            resident and streams the rest (see :mod:`mlnb.planner`); it prints its predicted peak. Overrides ``level``.
        loras: the LoRAs to apply, unfused: ``[path_or_id | (path_or_id, scale) | "PATH:SCALE", ...]``
            (``.safetensors`` files, folders holding one, or hub ids); ``[]`` removes the cached pipeline's LoRAs,
            None (the default) leaves them as they are.
        **from_pretrained_kwargs: passed to ``DiffusionPipeline.from_pretrained``: its own arguments (``variant``,
            ``revision``, ``token``...) and the pipeline's components (``scheduler=``). Any other name is refused.

    Returns:
        A :class:`ManagedPipeline`. A second call with the same model, dtype and setting returns the cached one.

    Raises:
        InvalidArgumentError: an argument that breaks a rule, or a keyword neither ``load_pipeline`` nor
            ``from_pretrained`` takes, before anything loads.
        LoadInterrupted: Ctrl-C while loading; its memory was freed and nothing was cached.
        ModelNotFoundError, UnsafeWeightsError, ModelLoadError, OfflineError: a LoRA that cannot be applied (one
            line); the pipeline is loaded and cached without the new LoRAs.

    Example:
        ```python
        >>> import mlnb
        >>> pipe = mlnb.load_pipeline("stabilityai/stable-diffusion-xl-base-1.0", budget="3.75GiB")
        >>> result = pipe.generate("a watercolor fox", steps=20, seed=1)
        >>> styled = mlnb.load_pipeline("stabilityai/stable-diffusion-xl-base-1.0", budget="3.75GiB",
        ...                             loras=[("ink.safetensors", 0.8)])  # the same pipeline, with a LoRA
        ```
    """
    specs = parse_loras(loras) if loras is not None else None  # a bad spec is refused before anything loads
    setting = MemorySetting.from_arguments(level, budget, config)
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidArgumentError(f"model must be a hub id (org/name) or a folder path, got {type(model).__name__}")
    if "torch_dtype" in from_pretrained_kwargs:
        if dtype is not None:
            raise InvalidArgumentError("dtype and torch_dtype are one argument: give dtype")
        dtype = from_pretrained_kwargs.pop("torch_dtype")
    managed = _load_pipeline(model, setting, dtype, allow_pickle, device, from_pretrained_kwargs, check_keywords=True)
    if specs is not None:
        managed.set_loras(specs, allow_pickle=allow_pickle)
    return managed


def load(model: str | os.PathLike, setting: MemorySetting, dtype=None, allow_pickle: bool = False,
         device: Device | None = None, **from_pretrained_kwargs) -> ManagedPipeline:
    """:func:`load_pipeline` for a caller that holds a :class:`~mlnb.setting.MemorySetting` already (the session's
    generation, the OOM rescue), with ``from_pretrained`` arguments ``load_pipeline`` has checked before."""
    return _load_pipeline(model, setting, dtype, allow_pickle, device, from_pretrained_kwargs, check_keywords=False)


def _load_pipeline(model, setting: MemorySetting, dtype, allow_pickle: bool, device: Device | None,
                   from_pretrained_kwargs: dict, check_keywords: bool) -> ManagedPipeline:
    device = device or get_device()
    source, is_local = resolve_model(model)
    # On a GPU the dtype depends on the model's family (bf16 for SD3.5 and Flux where the card computes it): the
    # first load of a hub model reads its index before the weights, so it does not load in one dtype and every later
    # load (index cached) in another.
    index = model_index(source, is_local, from_pretrained_kwargs, fetch=dtype is None and device.is_cuda)
    unverified: frozenset[str] = frozenset()
    if check_keywords and not FROM_PRETRAINED_KEYWORDS.issuperset(from_pretrained_kwargs):
        # a name only the pipeline's class could take waits for the class when its index is not at hand
        unverified = check_load_keywords(from_pretrained_kwargs, pipeline_parameters(index, from_pretrained_kwargs))
    torch_dtype = load_dtype(dtype, device, index)
    dname = dtype_name(torch_dtype)

    hit = _cached(source, dname, setting, device, from_pretrained_kwargs, allow_pickle)
    if hit is not None:
        return hit
    try:
        _loading.acquire()
    except KeyboardInterrupt:
        raise LoadInterrupted(f"interrupted while another load ran; {source!r} was not loaded") from None
    try:  # one load at a time: two would plan for the same free memory and hold two host copies at once
        hit = _cached(source, dname, setting, device, from_pretrained_kwargs, allow_pickle)
        if hit is not None:  # loaded by the other thread meanwhile
            return hit
        return _load(source, is_local, torch_dtype, setting, device, allow_pickle, from_pretrained_kwargs, unverified)
    finally:
        _loading.release()


def _load(source: str, is_local: bool, torch_dtype, setting: MemorySetting, device: Device, allow_pickle: bool,
          from_pretrained_kwargs: dict, unverified: frozenset[str]) -> ManagedPipeline:
    """Read, check, place and cache a pipeline that the cache did not have (the rest of :func:`load_pipeline`)."""
    dname = dtype_name(torch_dtype)
    if is_local:  # a refusal needs no room: checked before a cached copy could go to make it
        check_local_weights(source, allow_pickle)
        files.check_components(source, given=from_pretrained_kwargs)
    _make_host_room(source, torch_dtype)
    on_disk = files.weight_files(source) if is_local else None  # before reading: a change while it reads is noticed
    try:
        # weights whose files hold another dtype stay in the mapping until placed: cast part by part on the way
        pipe = read_pipeline(source, torch_dtype, allow_pickle=allow_pickle, **from_pretrained_kwargs)
    except KeyboardInterrupt as exc:
        release_exception_frames(exc)  # the half-read weights
        cleanup(device)
        raise LoadInterrupted(
            f"loading {source!r} was interrupted; its memory was freed and nothing was cached"
        ) from None
    plan = cfg = facts = None
    try:
        if unverified:  # the class is known now: a keyword it does not take is refused before anything is placed
            check_load_keywords(unverified, parameters_of(type(pipe)) | set(pipe.components))
        text_to_image_parameters(pipe)  # refuse it before it is optimized and cached: it could never generate
        if vae_needs_upcast(pipe) and device.info().native_bf16 and decode_in_bf16(pipe):
            # before planning: a bf16 decode needs half the memory of the fp32 one, so tiles are larger or none
            logger.info("the VAE decodes in bf16 on this card, not upcast to fp32 (half the memory, tensor cores)")
        choice, plan, facts = _choose(pipe, setting, device, torch_dtype)
        if plan is None or not device.is_cuda:  # not placed by a plan: cast on the host, part by part
            materialize_all(pipe)
        cfg = setting.config if setting.config is not None else MemoryOptimizationConfig.from_level(choice.level)
        # The same model at another level, dtype or revision: drop the old copy first, a small card cannot hold
        # both (outside the cache's lock: an unload waits for the copy's generation to end).
        tag = f"budget {setting.show_budget(plan.budget)}" if plan is not None else choice.level.value
        for other in cache.cached_pipelines():
            if other.model == source:
                old, new = _differences(other, tag, dname, device, from_pretrained_kwargs, allow_pickle)
                logger.warning("unloading %s (%s) to load it again as %s", source, old, new)
                other.unloaded_why = f"to load it again as {new}"
                other.unload()
        needed = _room_for_load(pipe, plan, cfg, device)
        if needed:  # other models' weights out of the way of this one's peak
            cache.make_room(needed, device, source)
        if plan is None:
            report = MemoryOptimizer(cfg, device).optimize_pipeline(pipe)
        elif device.is_cuda:
            report = apply.apply_plan(pipe, plan, device.torch_device, use_stream=True, ctx_device=device)
        else:
            cleanup(device)
            report = OptimizationReport(
                apply.plan_level(plan),
                tuple(skipped(t, "no CUDA device: the plan is computed, not applied") for t in Technique),
            )
    except BaseException as exc:
        del pipe
        # The frames that refused or placed it (the planner's, the optimizer's) still hold the pipeline: a refused
        # model would otherwise stay in memory through the stored traceback until the next error.
        release_exception_frames(exc)
        cleanup(device)
        if isinstance(exc, KeyboardInterrupt):
            raise LoadInterrupted(
                f"loading {source!r} was interrupted; its memory was freed and nothing was cached"
            ) from None
        if not device.is_oom(exc):
            raise
        stronger = stronger_level(cfg.level) if cfg is not None else None
        advice = f"try --level {stronger.value}" if stronger else "%vram who shows what holds GPU memory"
        at = f" at level {cfg.level.value}" if cfg is not None else ""
        raise OutOfMemoryRescueError(f"out of GPU memory loading {source!r}{at}; {advice}") from None
    load_kwargs = dict(from_pretrained_kwargs, allow_pickle=allow_pickle)
    managed = ManagedPipeline(
        pipe, source, torch_dtype, setting, choice, report, device, load_kwargs, plan=plan, plan_facts=facts,
        read_pickle=reads_pickle(source, is_local, allow_pickle),
    )
    cache.add(managed, on_disk)
    logger.debug("loaded %r", managed)
    return managed


def _make_host_room(source: str, torch_dtype) -> None:
    """Unload cached copies of ``source`` before reading it again when host RAM cannot hold a second copy beside
    them (Colab has 12.7 GB: two SDXL copies are more, and a kernel out of host RAM dies without an error). With
    room, the old copy is dropped only once the new one has loaded, so a failed load loses nothing."""
    from ..device import host_memory

    copies = [m for m in cache.cached_pipelines() if m.model == source]
    if not copies:
        return
    available = host_memory()[1]
    new = max(m.weight_bytes * torch_dtype.itemsize // m.dtype.itemsize for m in copies)
    if available is None or new * 1.1 < available:
        return
    for other in copies:
        logger.warning(
            "unloading %s (%s) before reading it again: host RAM has %s available, the new copy needs about %s",
            source, other.tag, format_bytes(available), format_bytes(new),
        )
        other.unloaded_why = "to free host RAM before reading it again"
        other.unload()


def _room_for_load(pipe, plan: Plan | None, config: MemoryOptimizationConfig, device: Device) -> int:
    """The free bytes a load must find on the GPU: a plan's peak with its margin; for a pipeline kept whole on the
    GPU (level none), its weights and one native-size image's activations; 0 for the offloading levels, which put
    nothing there between calls (the OOM rescue makes room for them when a generation needs it)."""
    if plan is not None:
        return room_needed(plan.predicted_peak)
    if not device.is_cuda or any(getattr(config, t) for t in ("model_cpu_offload", "sequential_cpu_offload", "group_offload")):
        return 0
    w, h = native_size(pipe)
    return weight_bytes(pipe) + activation_reserve(w, h, 1, vae_fp32=vae_needs_upcast(pipe))


def _choose(pipe, setting: MemorySetting, device: Device, dtype) -> tuple[LevelChoice, Plan | None, ModelFacts | None]:
    """The level for a load, and the plan behind it when there is one: a budget's plan; for auto, on a CUDA card the
    plan for the memory free now (the level table when nothing fits that), elsewhere the table; else the level of the
    setting (or of its config)."""
    if setting.budget is not None:
        plan, facts = _plan(pipe, setting.budget, setting, device, dtype)
        return LevelChoice(apply.plan_level(plan), plan_title(plan, setting), auto=False), plan, facts
    if setting.techniques is not None:
        return LevelChoice(setting.techniques.level, "chosen by the user", auto=False), None, None
    free = device.free_bytes()
    if device.is_cuda and free is not None:
        # Planned for what is free; when nothing fits that, for what other cached pipelines hold on the GPU too (they
        # are unloaded as far as the plan needs). Unloading them first would make switching between two models
        # read each one's files again every time.
        held = sum(held for _, held in cache.holders(device, besides=""))
        tries = [(f"the {format_bytes(free)} free", free)]
        if held:
            tries.append((f"the {format_bytes(free)} free and {format_bytes(held)} held by cached pipelines", free + held))
        error = None
        for room_for, budget in tries:
            if budget <= 0:
                continue
            try:
                plan, facts = _plan(pipe, budget, setting, device, dtype)
            except InvalidArgumentError as exc:
                error = exc
                continue
            return LevelChoice(apply.plan_level(plan), f"plan for {room_for}: {plan.summary()}"), plan, facts
        if error is not None:  # nothing fits: the strongest fixed level
            logger.warning("auto: %s; falling back to the level table", error)
    return _level_from_table(pipe, free), None, None


def _level_from_table(pipe, free: int | None) -> LevelChoice:
    """The level table's choice for the free VRAM, the weights and one native-size image's activations."""
    w, h = native_size(pipe)
    reserve = activation_reserve(w, h, 1, vae_fp32=vae_needs_upcast(pipe))
    return choose_level(free, weight_bytes(pipe), reserve)


def _plan(pipe, budget: int, setting: MemorySetting, device: Device, dtype) -> tuple[Plan, ModelFacts]:
    """The plan for ``budget`` bytes for ``pipe`` at its native size (30 steps), announced with the budget as
    ``setting`` shows it; a budget nothing fits is a one-line error."""
    w, h = native_size(pipe)
    work = Workload(w, h, 1, steps=30, vae_fp32=vae_needs_upcast(pipe))
    try:
        facts = blocks.model_facts(pipe)
        card = card_facts(device, blocks.model_key(pipe, dtype), work)
        plan = search.plan_for_budget(budget, facts, card, work, host=_host_budget(device))
    except (search.BudgetError, ValueError) as exc:  # nothing fits, or no UNet/transformer to plan for
        raise InvalidArgumentError(str(exc)) from None
    if device.has_memory_counters:
        logger.warning("%s; %s", plan_title(plan, setting), plan.prediction())
    else:  # a plan is applied on a GPU only: here it is shown, in one line
        logger.warning("%s", plan_not_applied(plan_title(plan, setting)))
    return plan, facts


def _host_budget(device: Device) -> int | None:
    """The host RAM a plan may pin: ``$MLNB_HOST_BUDGET`` when set (``"10GiB"`` or bytes: what a benchmark that
    stands in for a smaller host gives), else the host's available memory as the device reports it, less the
    planner's margin (:func:`mlnb.planner.search.host_budget`); None where unknown (no limit)."""
    from ..units import parse_bytes

    given = os.environ.get("MLNB_HOST_BUDGET", "").strip()
    if given:
        try:
            return parse_bytes(given)
        except ValueError:
            raise InvalidArgumentError(f"MLNB_HOST_BUDGET={given!r} is not a size (say 10GiB, or bytes)") from None
    info = device.info()
    if info.host_available_bytes is None:
        return None
    return search.host_budget(info.host_total_bytes, info.host_available_bytes)


def _cached(source: str, dname: str, setting: MemorySetting, device: Device, kwargs: dict,
            allow_pickle: bool) -> ManagedPipeline | None:
    """The cached pipeline that answers this load, or None."""
    if not setting.is_auto:
        hit = cache.find((source, dname, setting.key), device)
    else:
        # auto: any cached level of this model that auto chose before on this device is reused; on a CPU auto is
        # `none` (nothing to offload to), so a `none` loaded by name is what auto would load again.
        hit = cache.find_one(lambda m: m.model == source and dtype_name(m.dtype) == dname and m.choice.auto
                             and cache.same_device(m.device, device))
        if hit is None and not device.has_memory_counters:  # a CPU: the table says none
            hit = cache.find((source, dname, MemorySetting(level=OptimizationLevel.NONE).key), device)
    if hit is None or not _serves(hit, kwargs, allow_pickle) or _dropped_if_stale(hit):
        return None
    cache.touch(hit)  # asked for again: the last to make room
    return hit


def _dropped_if_stale(managed: ManagedPipeline) -> bool:
    """Unload a cached pipeline that is no longer what was loaded (:func:`cache.stale`), saying so in one line;
    True when it was."""
    why = cache.stale(managed)
    if why is None:
        return False
    logger.warning("%s: loading it again", why)
    managed.unloaded_why = f"because {why}"
    managed.unload()
    return True


def _serves(managed: ManagedPipeline, kwargs: dict, allow_pickle: bool) -> bool:
    """Whether a cached pipeline answers a load with these ``from_pretrained`` arguments: the same ones (another
    variant or revision is other weights), and weights read from pickle files only for a call that accepts pickle."""
    return _given(managed.load_kwargs) == _given(kwargs) and (allow_pickle or not managed.read_pickle)


def _given(kwargs: dict) -> dict:
    """``from_pretrained`` arguments as they choose weights: ``variant=None`` is the same as no variant."""
    return {k: v for k, v in kwargs.items() if k != "allow_pickle" and v is not None}


def _differences(other: ManagedPipeline, tag: str, dname: str, device: Device, kwargs: dict,
                 allow_pickle: bool) -> tuple[str, str]:
    """How a cached copy and the load (its ``tag``) replacing it differ, as the unload warning says it: (old, new),
    with secrets (a ``token``) masked."""
    old, new = [other.tag], [tag]
    if not cache.same_device(other.device, device):
        old.append(f"on {other.device.describe()[0]}")
        new.append(f"on {device.describe()[0]}")
    if dtype_name(other.dtype) != dname:
        old.append(dtype_name(other.dtype))
        new.append(dname)
    theirs, ours = _given(other.load_kwargs), _given(kwargs)
    shown_theirs, shown_ours = masked_kwargs(theirs), masked_kwargs(ours)
    for name in sorted(set(theirs) | set(ours)):
        if theirs.get(name) != ours.get(name):
            old.append(f"{name}={shown_theirs.get(name)!r}")
            new.append(f"{name}={shown_ours.get(name)!r}")
    if other.read_pickle and not allow_pickle:
        old.append("pickle weights")
        new.append("safetensors only")
    return ", ".join(old), ", ".join(new)
