"""Measured card facts for the budget planner, measured once per card and cached on disk.

``$MLNB_CACHE/cards.json`` (default ``~/.cache/mlnb``) holds, per card name:

- ``bandwidth``: the pinned host-to-device copy rate, measured the first time a plan is made on the card (~0.1 s);
- ``measured``: per model (``"UNet2DConditionModel-2567463684-float16"``) and workload (``"1024x1024x1"``), what a
  generation with everything resident on the GPU measured: the seconds of one denoising step and of the decode,
  and the activation bytes above the weights during the denoising loop and during the (untiled) decode. They are
  recorded after every such generation (so the step time is compute alone, with no weights streamed); ``mlnb
  bench`` records them with its uncapped baseline run, a notebook the first time the model runs unoffloaded.
  ``block_timeline`` is where each denoiser block started and how long it took in one resident forward (CUDA
  events, :class:`mlnb.planner.timing.BlockTimer`): the planner replays a streamed plan's copies against it.
  ``host_forward_seconds`` is the host's wall time to issue one resident forward of the denoiser (from its
  forward-pre-hook to its forward-hook, nothing waited for); ``host_unit_seconds`` what a streamed forward took on
  the host beyond that, per streamed unit (the streamer's hooks). Both are the same at every size (a kernel's launch
  does not grow with its tensors).
  ``unit_overhead`` is the seconds a streamed step took beyond the larger of its GPU chain (the replay) and its
  host chain, per streamed unit.
  ``fragmentation_reserve`` is how far the allocator's reserved bytes rose above its allocated peak over a resident
  denoising loop; the planner leaves at least that much of a budget unallocated.
  ``vae_fp32`` says whether the decode measured beside it ran in fp32 (SDXL's upcast VAE). A decode in fp16 or bf16
  (:func:`mlnb.optimizer.vae.decode_in_bf16`) needs half the activation bytes, so a decode reserve measured in the
  other precision is halved or doubled when read; its time is used as measured until a decode in this precision is.

Until a model has been measured on the card, the planner predicts time as unknown and uses the activation reserves
derived from the design notes' anchors. A measurement at another size is scaled by the pixel count (compute and
activations grow about linearly with pixels at these sizes).

A process reads the file once and keeps it in memory, reading it again only when it changed on disk (its time,
size or inode: another process recorded something); a measurement that changes what is stored is written through
at once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from ..device import Device
from .cost import CardFacts, Workload

logger = logging.getLogger(__name__)

__all__ = ["card_facts", "cache_path", "describe_card", "record_measured", "workload_key", "MEASURED_FIELDS"]

# What generations record (a resident one most of them), and whether each scales with the pixel count when used at
# another size.
MEASURED_FIELDS = (
    "step_seconds", "decode_seconds", "denoise_reserve", "decode_reserve",
    "decode_seconds_768", "decode_seconds_512", "decode_seconds_256", "other_seconds", "other_offload_seconds",
    "block_timeline", "unit_overhead", "fragmentation_reserve", "host_forward_seconds", "host_unit_seconds",
)
# a measured 0 is a figure (nothing beyond the two chains, no host time per unit)
_ZERO_MEANS = ("unit_overhead", "host_unit_seconds")
# The same at any size (roughly, for "other").
_UNSCALED = ("other_seconds", "other_offload_seconds", "unit_overhead", "host_forward_seconds", "host_unit_seconds")
# Fields files written by earlier versions may hold, which nothing reads any more: dropped when an entry is written.
_RETIRED = ("overlap",)


def cache_path() -> Path:
    """``$MLNB_CACHE/cards.json`` (default ``~/.cache/mlnb/cards.json``), read when asked."""
    return Path(os.environ.get("MLNB_CACHE", Path.home() / ".cache" / "mlnb")) / "cards.json"


class _Store:
    """One ``cards.json`` kept in memory: read from disk once, read again only when the file changed there (another
    process recorded something, or it was replaced), and written through when something new is recorded here."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cards: dict = {}
        self.stamp: tuple | None = None  # the file as last read or written: (mtime_ns, size, inode); None if absent
        self.loaded = False

    def _on_disk(self) -> tuple | None:
        try:
            found = self.path.stat()
        except OSError:
            return None
        return found.st_mtime_ns, found.st_size, found.st_ino

    def current(self) -> dict:
        """The cards, read again only if the file is not the one last read or written."""
        stamp = self._on_disk()
        if not self.loaded or stamp != self.stamp:
            try:
                self.cards = json.loads(self.path.read_text()) if stamp is not None else {}
            except (OSError, ValueError):
                self.cards = {}
            self.stamp, self.loaded = stamp, True
        return self.cards

    def save(self) -> None:
        """Write the cards as they are in memory (whole: a reader never sees half a file)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.cards, indent=1))
            tmp.replace(self.path)
        except OSError as exc:
            logger.debug("cannot write %s: %s", self.path, exc)
        self.stamp = self._on_disk()


_stores: dict[Path, _Store] = {}
_lock = threading.RLock()  # a generation in the dashboard's thread may record beside one in the kernel's


def _store() -> _Store:
    """The store of the cache file ``MLNB_CACHE`` names now."""
    path = cache_path()
    store = _stores.get(path)
    if store is None:
        store = _stores[path] = _Store(path)
    return store


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


def card_facts(device: Device, model: str | None = None, work: Workload | None = None,
               measure: bool = True) -> CardFacts:
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
    with _lock:
        entry = _store().current().get(name, {})
        if "bandwidth" in entry or not measure:
            return CardFacts(bandwidth=entry.get("bandwidth"), **_measured(entry, model, work))
    try:
        bandwidth = device.h2d_bandwidth()
    except Exception as exc:  # a failed measurement only costs the time prediction
        logger.warning("could not measure host-to-device bandwidth: %s", exc)
        bandwidth = None
    with _lock:
        store = _store()
        entry = store.current().setdefault(name, {})  # another process may have written meanwhile
        if bandwidth:
            entry["bandwidth"] = bandwidth
            store.save()
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
    with _lock:
        store = _store()
        measured = store.current().setdefault(name, {}).setdefault("measured", {}).setdefault(model, {})
        found = measured.setdefault(workload_key(work), {})
        before = json.dumps(found, sort_keys=True)
        if any(k.startswith("decode") for k in fresh):
            # The precision the decode fields were measured in; a reserve kept from the other one is converted to it.
            kept = _in_decode_precision({k: v for k, v in found.items() if k == "decode_reserve"},
                                        found.get("vae_fp32"), bool(work.vae_fp32))
            found.update(kept, vae_fp32=bool(work.vae_fp32))
        found.update(fresh)
        for retired in _RETIRED:
            found.pop(retired, None)
        if json.dumps(found, sort_keys=True) != before:  # written only when something changed
            store.save()


def describe_card(device: Device) -> str:
    """One line on what the planner has measured on this card: the bandwidth, and for how many model sizes a step
    time (which time predictions need) and a block timeline are cached."""
    name = _card_name(device)
    if name is None:
        return "no GPU: plans are shown, not timed"
    with _lock:
        entry = _store().current().get(name, {})
    bandwidth = entry.get("bandwidth")
    sizes = [found for model in entry.get("measured", {}).values() for found in model.values()]
    if bandwidth is None and not sizes:
        return f"nothing measured on {name} yet (in {cache_path()})"
    stepped = sum(1 for found in sizes if found.get("step_seconds"))
    timed = sum(1 for found in sizes if found.get("block_timeline"))
    rate = f"{bandwidth / 1e9:.1f} GB/s host to device" if bandwidth else "bandwidth not measured"
    return f"{rate}; step time for {stepped} model size(s), block timeline for {timed} (in {cache_path()})"
