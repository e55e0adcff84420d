"""Measured card facts for the budget planner, measured once per card and cached on disk.

The pinned host-to-device bandwidth is measured the first time a plan is made on a card (about 0.1 s) and kept in
``$MLNB_CACHE/cards.json`` (default ``~/.cache/mlnb``). Per-step compute time is only known from measurements
(``mlnb bench`` writes them); until then the planner predicts memory but not time.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .device import Device
from .plan import CardFacts

logger = logging.getLogger(__name__)

__all__ = ["card_facts", "cache_path"]


def cache_path() -> Path:
    return Path(os.environ.get("MLNB_CACHE", Path.home() / ".cache" / "mlnb")) / "cards.json"


def _read() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def card_facts(device: Device, measure: bool = True) -> CardFacts:
    """The cached facts for this card, measuring the bandwidth if it is missing (CUDA only)."""
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
            entry["bandwidth"] = bandwidth
            cards[info.name] = entry
            try:
                cache_path().parent.mkdir(parents=True, exist_ok=True)
                cache_path().write_text(json.dumps(cards, indent=1))
            except OSError as exc:
                logger.debug("cannot write %s: %s", cache_path(), exc)
    return CardFacts(
        bandwidth=entry.get("bandwidth"), step_seconds=entry.get("step_seconds"), decode_seconds=entry.get("decode_seconds")
    )
