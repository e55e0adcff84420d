"""The LoRA set of a loaded pipeline, applied with diffusers' own peft API and switched without reading the model.

:func:`set_loras` takes a pipeline from one set of LoRAs to another: the LoRAs it keeps are not read again, the new
ones are read and checked (:mod:`.loras`) before any is loaded, loaded with ``pipe.load_lora_weights(...,
adapter_name=...)`` and weighted with ``pipe.set_adapters(names, scales)``; the LoRAs it drops are deleted
(``pipe.delete_adapters``), and an empty set unloads every adapter layer (``pipe.unload_lora_weights``). The base
weights are never read from disk again, and a failure leaves the pipeline with the set it had.

Unfused, not fused. Each adapted layer becomes a peft layer that computes ``base(x) + scale * B(A(x))`` beside the
untouched base weight. Removing the adapters puts the very base layer objects back, so the base weights and the
image are bit-exact after a clear, and a LoRA at scale 0 adds zeros, so the image is the base image. diffusers'
``fuse_lora`` adds ``scale * B @ A`` into the weights and ``unfuse_lora`` subtracts it again, which is not exact in
fp16 (nor in fp32), and a fused switch does the same work plus a fuse and an unfuse of every adapted weight. The
cost of unfused adapters is two thin matmuls per adapted layer and step (docs/benchmarks.md, "LoRA adapters on the
CPU", measures both on the tiny models with ``scripts/bench_loras.py``).

What each memory technique needs, checked on the CPU as far as it runs there (tests/test_loras.py):

- fp8 storage (diffusers' layerwise casting): peft places a new adapter in its base layer's dtype, which at rest is
  fp8, where it neither computes nor keeps the LoRA's values. :func:`set_loras` gives the adapters of a layer that
  is stored in fp8 the compute dtype and the file's values again, so they add to what the layer computes, and the
  fp8 copy of the base weight is never changed. Load LoRAs after fp8 storage is applied (never before: the adapters
  would be stored in fp8 too).
- model CPU offload: ``load_lora_weights`` takes the accelerate hooks off and puts them back, calling
  ``enable_model_cpu_offload()`` with no device, so the pipeline's accelerator is found again (on a CPU there is
  none, and that call fails: mlnb installs no offload without CUDA). The adapters move with their component.
- sequential CPU offload: the same, with ``enable_sequential_cpu_offload()``; the adapters get hooks of their own.
  Not runnable on a CPU (accelerate cannot offload to the device it onloads to).
- diffusers' group offloading: loading, deleting and unloading adapters remove the group hooks and apply them again
  over the new layers (``_maybe_remove_and_reapply_group_offloading``); after the fp8 repair above, this module
  applies them again once more, since the groups copied the adapters as they were. Runs on a CPU with the CPU as
  the onload device where diffusers allows it (0.42; 0.39 looks for an accelerator).
- mlnb's streamed units (a budget plan): diffusers takes the streamer's hooks, registered under group offloading's
  name, for its own and crashes re-applying them, so :func:`set_loras` takes the streamers off the LoRA components
  first (every unit back in its host region), changes the adapters, and streams the same units again: the adapters
  of a streamed unit are packed into its host region beside its base weights and travel with it, unfused; those of
  a resident layer stay on the GPU with it. A change of scales alone changes no layer and lifts nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgumentError, ModelLoadError
from ..planner import module_streamer, stream_units
from .loras import LoraFile, LoraSpec, LoraWeights, _one_line, check_lora, parse_loras, read_lora, resolve_lora

logger = logging.getLogger(__name__)

__all__ = ["ActiveLora", "set_loras", "clear_loras", "active_loras", "adapter_bytes"]


@dataclass(frozen=True)
class ActiveLora:
    """A LoRA applied to a pipeline.

    Args:
        spec: what the user asked for (source and scale).
        path: the weights file it was read from.
        adapter_name: its name in the pipeline's peft layers.
        components: the components it adapts (``unet``, ``text_encoder``, ...).
        nbytes: bytes of its adapter weights in the pipeline, in their dtype there.
    """

    spec: LoraSpec
    path: Path
    adapter_name: str
    components: tuple[str, ...]
    nbytes: int

    def __str__(self) -> str:
        return str(self.spec)


# The LoRAs set_loras applied, by pipeline (the adapter names, as peft layers hold them, say no scale or source).
_applied: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def active_loras(pipe) -> tuple[ActiveLora, ...]:
    """The LoRAs :func:`set_loras` applied to ``pipe``, in the order given."""
    return tuple(_applied.get(pipe, {}).values())


def adapter_name(file: LoraFile) -> str:
    """A peft adapter name for the file as it is now: the name the user gave and a digest of the file's path, size
    and time."""
    digest = hashlib.sha1(repr(file.identity).encode()).hexdigest()[:8]
    named = Path(file.spec.source.rstrip("/\\")).stem  # the file, the folder or the hub repository's name
    stem = re.sub(r"\W+", "_", named)[:40].strip("_") or "lora"
    return f"{stem}_{digest}"


def _lora_components(pipe) -> list[tuple[str, object]]:
    import torch

    names = getattr(type(pipe), "_lora_loadable_modules", ()) or ()
    return [(n, getattr(pipe, n)) for n in names if isinstance(getattr(pipe, n, None), torch.nn.Module)]


def adapter_bytes(pipe, name: str) -> int:
    """Bytes of adapter ``name``'s weights in ``pipe``'s peft layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    total = 0
    for _, model in _lora_components(pipe):
        for module in model.modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            for attr in module.adapter_layer_names:
                layer = getattr(module, attr, None)
                if layer is not None and name in layer:
                    part = layer[name]
                    tensors = part.parameters() if hasattr(part, "parameters") else [part]
                    total += sum(t.numel() * t.element_size() for t in tensors)
    return total


class _QuietEmptyComponents(logging.Filter):
    """Drops diffusers' warning, per component and LoRA, that a LoRA has no keys for a component (a LoRA of the
    UNet alone says so for each text encoder): the LoRA's components are checked before it is loaded."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


_QUIET = _QuietEmptyComponents()


@contextlib.contextmanager
def _quiet_loading():
    """Without diffusers' note on components a LoRA has no keys for, and peft's warning that a model gets a second
    adapter (several adapters are the point here)."""
    import warnings

    loggers = [logging.getLogger(n) for n in ("diffusers.loaders.peft", "diffusers.loaders.lora_base")]
    for lg in loggers:
        lg.addFilter(_QUIET)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(_QUIET)


def _casting_dtype(module):
    """The compute dtype of ``module``'s layerwise casting (fp8 storage), or None."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook("layerwise_casting") if registry is not None else None
    return getattr(hook, "compute_dtype", None)


def _adapters_to_compute_dtype(pipe, name: str, weights: LoraWeights) -> None:
    """Give adapter ``name`` of every layer stored in fp8 the layer's compute dtype and the file's exact values
    (peft made it in the storage dtype).

    As diffusers' own load does, accelerate's hooks are off meanwhile (sequential offload keeps a map of the weights
    it onloads, which would still hold the fp8 adapters) and put back after, and group offloading is applied again
    over the changed adapters.
    """
    from diffusers.hooks.group_offloading import _is_group_offload_enabled, _maybe_remove_and_reapply_group_offloading
    from diffusers.loaders.lora_base import _func_optionally_disable_offloading

    cast = []  # (component, layer, A, B, compute dtype)
    for component, pairs in weights.targets.items():
        for path, (a, b) in pairs.items():
            layer = getattr(pipe, component).get_submodule(path)
            dtype = _casting_dtype(layer.get_base_layer())
            if dtype is not None:
                cast.append((component, layer, a, b, dtype))
    if not cast:
        return
    model_offload, sequential, _ = _func_optionally_disable_offloading(pipe)
    try:
        for _, layer, a, b, dtype in cast:
            for adapter, value in ((layer.lora_A[name], a), (layer.lora_B[name], b)):
                adapter.to(dtype=dtype)
                adapter.weight.data.copy_(value)
    finally:
        if sequential:
            pipe.enable_sequential_cpu_offload()
        elif model_offload:
            pipe.enable_model_cpu_offload()
    for component in dict.fromkeys(c for c, *_ in cast):
        if _is_group_offload_enabled(getattr(pipe, component)):
            _maybe_remove_and_reapply_group_offloading(getattr(pipe, component))


@contextlib.contextmanager
def _streamers_lifted(pipe):
    """Take mlnb's streamers off the LoRA components while their adapters change, and stream the same units again
    after: the adapters of a streamed unit are packed into its host region beside its base weights and travel with
    it; those of a resident layer stay on the GPU with it. diffusers would take the streamers' hooks (registered
    under group offloading's name) for its own and fail to apply them again."""
    lifted = []
    for _, model in _lora_components(pipe):
        streamer = module_streamer(model)
        if streamer is not None:
            streamer.remove()  # every unit back home: its weights are views of its host region
            lifted.append((model, list(streamer.units), streamer))
    try:
        yield
    finally:
        for model, names, old in lifted:
            stream_units(model, names, old.onload_device, old.device, old.stream, old.device.host_buffer,
                         keep_slots=old.keep_slots, slots=old.slot_count)


def _load(pipe, name: str, weights: LoraWeights) -> None:
    with _quiet_loading():
        pipe.load_lora_weights(dict(weights.tensors), adapter_name=name)
    _adapters_to_compute_dtype(pipe, name, weights)


def _present(pipe) -> set[str]:
    try:
        lists = pipe.get_list_adapters()
    except Exception:
        return set()
    return {n for names in lists.values() for n in names}


def clear_loras(pipe) -> None:
    """Remove every adapter from ``pipe``: the peft layers give their base layers back, bit-exact."""
    if _present(pipe) or _applied.get(pipe):
        with _streamers_lifted(pipe):
            pipe.unload_lora_weights()
    _applied.pop(pipe, None)


def set_loras(pipe, loras, allow_pickle: bool = False) -> tuple[ActiveLora, ...]:
    """Apply exactly the LoRAs ``loras`` to ``pipe``, unfused; an empty list (or None) removes them all.

    LoRAs already applied (the same file, unchanged) are kept and only weighted anew; the others are resolved, read
    and checked first, all of them, so a bad one changes nothing. Nothing of the base model is read from disk.

    Args:
        pipe: a diffusers pipeline with LoRA support (Stable Diffusion, SDXL, ...).
        loras: ``[path_or_id | (path_or_id, scale) | "PATH:SCALE", ...]`` (:func:`mlnb.pipeline.loras.parse_loras`).
        allow_pickle: accept pickle LoRA files (``.bin``, ``.pt``, ``.ckpt``). Off by default: pickle can run code.

    Returns:
        The applied LoRAs, with their adapter names and bytes.

    Raises:
        InvalidArgumentError, ModelNotFoundError, UnsafeWeightsError, OfflineError, ModelLoadError: one line each
            (see :mod:`mlnb.pipeline.loras`); the pipeline keeps the LoRAs it had.

    Example:
        ```python
        >>> from mlnb.pipeline.adapters import set_loras
        >>> set_loras(pipe, ["ink.safetensors", ("watercolor.safetensors", 0.6)])
        >>> set_loras(pipe, [])  # the base model again, bit-exact
        ```
    """
    specs = parse_loras(loras)
    files = [resolve_lora(spec, allow_pickle) for spec in specs]
    names = [adapter_name(f) for f in files]
    for i, name in enumerate(names):
        if name in names[:i]:
            first = specs[names.index(name)].source
            raise InvalidArgumentError(f"LoRA {specs[i].source!r} names the same file as {first!r}")
    current: dict[str, ActiveLora] = dict(_applied.get(pipe, {}))
    new = {name: check_lora(pipe, f, read_lora(f)) for name, f in zip(names, files) if name not in current}
    if not specs:
        clear_loras(pipe)
        return ()
    dropped = [n for n in current if n not in names]
    # only a change of the adapter layers lifts the streamers (and packs their host regions again), not new scales
    with _streamers_lifted(pipe) if new or dropped else contextlib.nullcontext():
        loaded: list[str] = []
        try:
            for name, weights in new.items():
                loaded.append(name)
                _load(pipe, name, weights)
            pipe.set_adapters(names, [s.scale for s in specs])
        except BaseException as exc:
            _undo(pipe, loaded, current)
            if not isinstance(exc, Exception):
                raise
            failed = new[loaded[-1]].file.shown if loaded else "the LoRAs"
            raise ModelLoadError(f"could not apply LoRA {failed!r}: {_one_line(exc)}") from None
        if dropped:
            pipe.delete_adapters(dropped)
    applied = {}
    for spec, file, name in zip(specs, files, names):
        components = current[name].components if name in current else new[name].components
        applied[name] = ActiveLora(spec, file.path, name, components, adapter_bytes(pipe, name))
    _applied[pipe] = applied
    logger.debug("LoRAs applied: %s", ", ".join(f"{a} ({a.nbytes} B)" for a in applied.values()))
    return tuple(applied.values())


def _undo(pipe, loaded: list[str], previous: dict[str, ActiveLora]) -> None:
    """Take the adapters of a failed :func:`set_loras` out again and weight the previous set as it was."""
    if not previous:
        if _present(pipe):
            pipe.unload_lora_weights()
        return
    pipe.set_adapters(list(previous), [a.spec.scale for a in previous.values()])  # first: peft warns of an active one
    stale = [n for n in loaded if n in _present(pipe)]
    if stale:
        pipe.delete_adapters(stale)
