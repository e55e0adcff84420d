"""Measured card facts for the budget planner, measured once per card and cached on disk.

``$MLNB_CACHE/cards.json`` (default ``~/.cache/mlnb``) holds, per card name:

- ``bandwidth``: the pinned host-to-device copy rate, measured the first time a plan is made on the card (~0.1 s);
- ``timings``: per model (``"UNet2DConditionModel-2567463684-float16"``) and workload (``"1024x1024x1"``), the seconds
  of one denoising step and of the decode, recorded after every generation whose denoiser was fully resident on
  the GPU (so the step time is compute alone, with no weights streamed). ``mlnb bench`` records them with its
  uncapped baseline run; a notebook records them the first time the model runs unoffloaded on the card.

Until a model has a timing on the card the planner predicts memory but not time. A timing measured at another
size is scaled by the pixel count (denoiser compute grows about linearly with pixels at these sizes) and says so.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .device import Device
from .plan import CardFacts, Workload

logger = logging.getLogger(__name__)

__all__ = ["card_facts", "cache_path", "record_timing", "workload_key"]


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


def _timing(entry: dict, model: str | None, work: Workload | None) -> tuple[float | None, float | None]:
    """Step and decode seconds for ``model`` at ``work``: measured there, else scaled from the nearest size."""
    if model is None or work is None:
        return None, None
    measured = entry.get("timings", {}).get(model, {})
    if not measured:
        return None, None
    key = workload_key(work)
    if key in measured:
        found = measured[key]
        return found.get("step_seconds"), found.get("decode_seconds")
    want = work.width * work.height * work.batch
    nearest = min(measured, key=lambda k: abs(_pixels(k) - want))
    scale = want / _pixels(nearest)
    found = measured[nearest]
    logger.debug("timing of %s at %s scaled ×%.2f from %s", model, key, scale, nearest)
    step, decode = found.get("step_seconds"), found.get("decode_seconds")
    return (step * scale if step else None), (decode * scale if decode else None)


def card_facts(device: Device, model: str | None = None, work: Workload | None = None, measure: bool = True) -> CardFacts:
    """The cached facts for this card, measuring the bandwidth if it is missing (CUDA only).

    Args:
        device: the card.
        model: the model key (:func:`mlnb.optimizer.budget.model_key`) whose step time is wanted.
        work: the size and batch the step time is for.
        measure: measure the bandwidth when it is not cached yet.
    """
    info = device.info()
    if not info.available:
        return CardFacts()
    cards = _read()
    entry = cards.get(info.name, {})
    if "bandwidth" not in entry and measure:
        try:
            bandwidth = device.h2d_bandwidth()
        except Exception as exc:  # a failed measurement only costs the time prediction
            logger.warning("could not measure host-to-device bandwidth: %s", exc)
            bandwidth = None
        if bandwidth:
            cards = _read()  # another process may have written meanwhile
            entry = cards.setdefault(info.name, {})
            entry["bandwidth"] = bandwidth
            _write(cards)
    step, decode = _timing(entry, model, work)
    return CardFacts(bandwidth=entry.get("bandwidth"), step_seconds=step, decode_seconds=decode)


def record_timing(device: Device, model: str, work: Workload, step_seconds: float, decode_seconds: float | None) -> None:
    """Remember one resident generation's step and decode seconds for ``model`` at ``work`` on this card.

    The newest measurement replaces the older one: the card, driver and versions of the last run are the ones that
    predictions are made for. ``decode_seconds=None`` (the VAE was tiled or offloaded) keeps the decode time stored.
    """
    info = device.info()
    if not info.available or not step_seconds or step_seconds <= 0:
        return
    cards = _read()
    timings = cards.setdefault(info.name, {}).setdefault("timings", {}).setdefault(model, {})
    found = timings.setdefault(workload_key(work), {})
    found["step_seconds"] = round(step_seconds, 5)
    if decode_seconds and decode_seconds > 0:  # else the decode measured before stays
        found["decode_seconds"] = round(decode_seconds, 4)
    _write(cards)
