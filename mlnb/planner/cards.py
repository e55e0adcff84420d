"""Measured card facts for the budget planner, measured once per card and cached on disk.

``$MLNB_CACHE/cards.json`` (default ``~/.cache/mlnb``) holds, per card name:

- ``bandwidth``: the pinned host-to-device copy rate, measured the first time a plan is made on the card (~0.1 s);
- ``measured``: per model (``"UNet2DConditionModel-2567463684-float16"``) and workload (``"1024x1024x1"``), what a
  generation with everything resident on the GPU measured: the seconds of one denoising step and of the decode,
  and the activation bytes above the weights during the denoising loop and during the (untiled) decode. They are
  recorded after every such generation (so the step time is compute alone, with no weights streamed); ``mlnb
  bench`` records them with its uncapped baseline run, a notebook the first time the model runs unoffloaded.
  ``overlap`` comes from a generation that streamed part of the denoiser: the fraction of the shorter of compute and
  copies that the copies hid (0: they added up; 1: the step took the longer of the two).
  ``block_timeline`` is where each denoiser block started and how long it took in one resident forward (CUDA
  events, :class:`mlnb.planner.timing.BlockTimer`): the planner replays a streamed plan's copies against it.
  ``unit_overhead`` is the seconds a streamed step took beyond the step that replay predicted for the same plan,
  per streamed unit.
  ``fragmentation_reserve`` is how far the allocator's reserved bytes rose above its allocated peak over a resident
  denoising loop; the planner leaves at least that much of a budget unallocated.
  ``vae_fp32`` says whether the decode measured beside it ran in fp32 (SDXL's upcast VAE). A decode in fp16 or bf16
  (:func:`mlnb.optimizer.vae.decode_in_bf16`) needs half the activation bytes, so a decode reserve measured in the
  other precision is halved or doubled when read; its time is used as measured until a decode in this precision is.

Until a model has been measured on the card, the planner predicts time as unknown and uses the activation reserves
derived from the design notes' anchors. A measurement at another size is scaled by the pixel count (compute and
activations grow about linearly with pixels at these sizes).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..device import Device
from .cost import CardFacts, Workload

logger = logging.getLogger(__name__)

__all__ = ["card_facts", "cache_path", "describe_card", "record_measured", "workload_key", "MEASURED_FIELDS"]

# What generations record (a resident one most of them), and whether each scales with the pixel count when used at
# another size.
MEASURED_FIELDS = (
    "step_seconds", "decode_seconds", "denoise_reserve", "decode_reserve", "overlap",
    "decode_seconds_768", "decode_seconds_512", "decode_seconds_256", "other_seconds", "other_offload_seconds",
    "block_timeline", "unit_overhead", "fragmentation_reserve",
)
# The same at any size (roughly, for "other").
_ZERO_MEANS = ("overlap", "unit_overhead")  # a measured 0 is a figure (nothing hidden, nothing beyond the replay)
_UNSCALED = ("overlap", "other_seconds", "other_offload_seconds", "unit_overhead")


def cache_path() -> Path:
    return Path(os.environ.get("MLNB_CACHE", Path.home() / ".cache" / "mlnb")) / "cards.json"


def _read() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write(cards: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cards, indent=1))
        tmp.replace(path)  # a reader never sees half a file
    except OSError as exc:
        logger.debug("cannot write %s: %s", path, exc)


def workload_key(work: Workload) -> str:
    """``"1024x1024x1"``: width, height and batch (images per prompt)."""
    return f"{work.width}x{work.height}x{work.batch}"


def _pixels(key: str) -> int:
    w, h, b = (int(x) for x in key.split("x"))
    return w * h * b


def _measured(entry: dict, model: str | None, work: Workload | None) -> dict:
    """The measured fields for ``model`` at ``work``: measured there, else scaled from the nearest size."""
    if model is None or work is None:
        return {}
    measured = entry.get("measured", {}).get(model, {})
    if not measured:
        return {}
    key = workload_key(work)
    want = work.width * work.height * work.batch
    nearest = key if key in measured else min(measured, key=lambda k: abs(_pixels(k) - want))
    scale = want / _pixels(nearest)  # 1 where this size was measured
    if nearest != key:
        logger.debug("measurements of %s at %s scaled ×%.2f from %s", model, key, scale, nearest)
    found = {}
    for name in MEASURED_FIELDS:
        value = measured[nearest].get(name)
        if value is None:
            continue
        if name == "block_timeline":
            found[name] = _timeline(value, scale)
        elif name in _UNSCALED:
            found[name] = value
        elif value:
            found[name] = int(value * scale) if name.endswith("reserve") else value * scale
    return _in_decode_precision(found, measured[nearest].get("vae_fp32"), work.vae_fp32)


def _in_decode_precision(found: dict, measured_fp32: bool | None, want_fp32: bool) -> dict:
    """``found`` with its decode reserve for a decode in fp32 (``want_fp32``) or in 16 bits, when it was measured in
    the other (activations of half or twice the bytes)."""
    if measured_fp32 is None or bool(measured_fp32) == want_fp32 or not found.get("decode_reserve"):
        return found
    return {**found, "decode_reserve": int(found["decode_reserve"] * (2 if want_fp32 else 0.5))}


def _timeline(stored, scale: float = 1.0):
    """A stored ``[forward, [[block, start, seconds], ...]]`` as the planner's tuples, times scaled by ``scale``."""
    try:
        forward, rows = stored
        return forward * scale, tuple((str(n), float(a) * scale, float(d) * scale) for n, a, d in rows)
    except (TypeError, ValueError):
        return None


def _card_name(device: Device) -> str | None:
    """The name the card's facts are cached under; None without a GPU. Cheap: ``describe`` is cached on CUDA, where
    a full ``info`` would ask NVML and the driver again at every generation."""
    return None if device.kind == "cpu" else device.describe()[0]


def card_facts(device: Device, model: str | None = None, work: Workload | None = None, measure: bool = True) -> CardFacts:
    """The cached facts for this card, measuring the bandwidth if it is missing (CUDA only).

    Args:
        device: the card.
        model: the model key (:func:`mlnb.planner.blocks.model_key`) whose measurements are wanted.
        work: the size and batch they are for.
        measure: measure the bandwidth when it is not cached yet.
    """
    name = _card_name(device)
    if name is None:
        return CardFacts()
    cards = _read()
    entry = cards.get(name, {})
    if "bandwidth" not in entry and measure:
        try:
            bandwidth = device.h2d_bandwidth()
        except Exception as exc:  # a failed measurement only costs the time prediction
            logger.warning("could not measure host-to-device bandwidth: %s", exc)
            bandwidth = None
        if bandwidth:
            cards = _read()  # another process may have written meanwhile
            entry = cards.setdefault(name, {})
            entry["bandwidth"] = bandwidth
            _write(cards)
    return CardFacts(bandwidth=entry.get("bandwidth"), **_measured(entry, model, work))


def record_measured(device: Device, model: str, work: Workload, **values: float | int | None) -> None:
    """Remember what one resident generation of ``model`` at ``work`` measured on this card.

    ``values`` are any of :data:`MEASURED_FIELDS`; ``None`` (not measured this time, e.g. the decode of a tiled or
    offloaded VAE) keeps the value stored before. The newest measurement replaces the older one: the card, driver
    and versions of the last run are the ones predictions are made for.
    """
    unknown = set(values) - set(MEASURED_FIELDS)
    if unknown:
        raise ValueError(f"unknown measurement(s) {sorted(unknown)}: use {', '.join(MEASURED_FIELDS)}")
    name = _card_name(device)
    timeline = values.pop("block_timeline", None)
    fresh = {k: v for k, v in values.items() if v is not None and (v > 0 or (k in _ZERO_MEANS and v == 0))}
    fresh = {k: (int(v) if k.endswith("reserve") else round(float(v), 5)) for k, v in fresh.items()}
    if timeline:
        forward, rows = timeline
        fresh["block_timeline"] = [round(forward, 6), [[n, round(a, 6), round(d, 6)] for n, a, d in rows]]
    if name is None or not fresh:
        return
    cards = _read()
    found = cards.setdefault(name, {}).setdefault("measured", {}).setdefault(model, {})
    found = found.setdefault(workload_key(work), {})
    if any(k.startswith("decode") for k in fresh):
        # The precision the decode fields were measured in; a reserve kept from the other one is converted to it.
        kept = _in_decode_precision({k: v for k, v in found.items() if k == "decode_reserve"},
                                    found.get("vae_fp32"), bool(work.vae_fp32))
        found.update(kept, vae_fp32=bool(work.vae_fp32))
    found.update(fresh)
    _write(cards)


def describe_card(device: Device) -> str:
    """One line on what the planner has measured on this card: the bandwidth, and for how many model sizes a step
    time (which time predictions need) and a block timeline are cached."""
    name = _card_name(device)
    if name is None:
        return "no GPU: plans are shown, not timed"
    entry = _read().get(name, {})
    bandwidth = entry.get("bandwidth")
    sizes = [found for model in entry.get("measured", {}).values() for found in model.values()]
    if bandwidth is None and not sizes:
        return f"nothing measured on {name} yet (in {cache_path()})"
    stepped = sum(1 for found in sizes if found.get("step_seconds"))
    timed = sum(1 for found in sizes if found.get("block_timeline"))
    rate = f"{bandwidth / 1e9:.1f} GB/s host to device" if bandwidth else "bandwidth not measured"
    return f"{rate}; step time for {stepped} model size(s), block timeline for {timed} (in {cache_path()})"
