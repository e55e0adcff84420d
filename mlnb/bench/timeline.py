"""What the GPU did while weights streamed: kernels, host-to-device copies and idle time, read from a profiler trace.

``torch.profiler`` (CUDA activity) writes a Chrome trace in which every kernel (``"cat": "kernel"``) and every copy
(``"cat": "gpu_memcpy"``) is an interval on its stream. Streamed weights arrive as copies from pinned memory
("Memcpy HtoD (Pinned -> Device)"). Over the window from the first such copy to the last, :func:`summarize` gives:

- ``copy_seconds``: the copies' time, ``copy_bandwidth`` the bytes they moved per second of it (against the
  bandwidth measured on the idle card: whether copies slow down beside the compute), and ``hidden``, the share of
  their time during which a kernel ran on another stream;
- ``kernel_seconds``: the time at least one kernel ran, and ``idle_seconds``: the time neither a kernel nor a copy ran
  (the GPU waiting for the host, or for a copy it needed).

So a streamed step that takes compute plus copies shows as ``hidden`` near 0 with the GPU busy, while one held back
by the host shows as idle time.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

__all__ = ["read_trace", "summarize"]

_PINNED_COPY = ("HtoD", "Pinned")


def read_trace(path: str | Path) -> list[dict]:
    """The events of a Chrome trace file (``.json`` or ``.json.gz``)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        doc = json.load(fh)
    return doc["traceEvents"] if isinstance(doc, dict) else doc


def _intervals(events: list[dict], keep) -> list[tuple[float, float]]:
    return sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("ph") == "X" and keep(e))


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in intervals:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _clip(intervals, lo: float, hi: float):
    return [(max(s, lo), min(e, hi)) for s, e in intervals if e > lo and s < hi]


def _length(intervals) -> float:
    return sum(e - s for s, e in intervals)


def _overlap(a, b) -> float:
    """Length of the intersection of two sorted, disjoint interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize(events: list[dict]) -> dict:
    """Seconds of copies, kernels and idle time over the window of the streamed (pinned) copies; without any, the
    names of the copies the trace has."""
    pinned = [e for e in events if e.get("cat") == "gpu_memcpy" and all(k in e.get("name", "") for k in _PINNED_COPY)]
    copies = _intervals(pinned, lambda e: True)
    if not copies:  # say which copies there were, in case the profiler names them otherwise
        names = {e.get("name", "") for e in events if e.get("cat") == "gpu_memcpy"}
        return {"copies": 0, "memcpy_names": sorted(names)}
    lo, hi = copies[0][0], max(e for _, e in copies)
    kernels = _union(_clip(_intervals(events, lambda e: e.get("cat") == "kernel"), lo, hi))
    copy_union = _union(copies)
    busy = _union(sorted(kernels + copy_union))
    copy_time = _length(copy_union)
    moved = sum(e.get("args", {}).get("bytes", 0) for e in pinned)
    us = 1e-6
    return {
        "window_seconds": (hi - lo) * us,
        "copies": len(copies),
        "copy_seconds": copy_time * us,
        # bytes/s while copying (kineto writes each copy's bytes): below the idle card's bandwidth, the copies slowed
        "copy_bandwidth": moved / (copy_time * us) if moved and copy_time else None,
        "hidden": _overlap(copy_union, kernels) / copy_time if copy_time else 0.0,
        "kernel_seconds": _length(kernels) * us,
        "idle_seconds": ((hi - lo) - _length(busy)) * us,
    }
