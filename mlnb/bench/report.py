"""What the benchmark's numbers mean: ratios, the streaming floor, the table and the JSON. Pure.

The targets and their verdicts are in :mod:`.targets`.

The streaming floor is the least time a recipe could take under a budget. Compute cannot get faster than the
uncapped no-offload run, and the denoiser weights that do not fit in the budget must cross the PCIe bus once per
step::

    fit       = max(0, budget - activations)                 # bytes of weights that can stay on the GPU
    streamed  = max(0, denoiser_fp16_bytes - fit) * steps     # bytes copied host -> device per image
    floor     = max(compute_seconds, streamed / h2d_bandwidth)

``compute_seconds`` is the seconds per image of the uncapped ``diffusers-none`` run of the same model, size and steps;
``activations`` is :func:`mlnb.levels.activation_reserve` for the image size (derived from measured fp16 peaks);
``h2d_bandwidth`` is the card's pinned host-to-device copy rate (:meth:`mlnb.device.Device.h2d_bandwidth`). Text
encoders and the VAE run once per image and are left out, so the floor stays a lower bound. fp8 storage (ultra)
halves the bytes that really cross the bus, so a recipe using it can beat this fp16 floor.
"""

from __future__ import annotations

from ..levels import activation_reserve
from ..units import format_bytes, format_gib
from .recipes import BASELINE
from .targets import TARGETS, Target, applies, cap_text, evaluate_targets, format_targets

__all__ = [
    "FLOOR_FORMULA",
    "cap_text",
    "streamed_bytes",
    "streaming_floor",
    "add_derived",
    "Target",
    "TARGETS",
    "applies",
    "evaluate_targets",
    "format_table",
    "format_targets",
    "format_markdown",
    "lora_summary",
    "format_loras",
]

FLOOR_FORMULA = (
    "floor = max(compute_s, max(0, denoiser_fp16_bytes - max(0, cap - activations)) * steps / h2d_bandwidth)"
)


def streamed_bytes(denoiser_bytes: int, budget_bytes: int | None, activation_bytes: int, steps: int) -> int:
    """Bytes of denoiser weights copied to the GPU per image under ``budget_bytes`` (0 when uncapped)."""
    if budget_bytes is None:
        return 0
    fit = max(0, budget_bytes - activation_bytes)
    return max(0, denoiser_bytes - fit) * steps


def streaming_floor(
    compute_seconds: float | None,
    denoiser_bytes: int | None,
    budget_bytes: int | None,
    activation_bytes: int,
    steps: int,
    bandwidth: float | None,
) -> float | None:
    """``max(compute_seconds, streamed / bandwidth)``: the least seconds per image under the budget.

    Returns ``None`` when it cannot be known: no compute time, or weights to stream and no bandwidth figure.

    Example:
        ```python
        >>> streaming_floor(1.0, 5 * GiB, 4 * GiB, 1 * GiB, 10, 20 * GiB)   # 2 GiB x 10 steps at 20 GiB/s
        1.0
        >>> streaming_floor(0.5, 5 * GiB, 4 * GiB, 1 * GiB, 10, 10 * GiB)
        2.0
        ```
    """
    if compute_seconds is None:
        return None
    streamed = streamed_bytes(denoiser_bytes or 0, budget_bytes, activation_bytes, steps)
    if streamed == 0:
        return compute_seconds
    if not bandwidth:
        return None
    return max(compute_seconds, streamed / bandwidth)


def _key(row: dict) -> tuple:
    return (row.get("model"), row.get("width"), row.get("height"), row.get("steps"))


def _baselines(rows: list[dict]) -> dict[tuple, dict]:
    return {
        _key(r): r
        for r in rows
        if r.get("recipe") == BASELINE and r.get("cap_bytes") is None and r.get("status") == "ok" and r.get("seconds")
    }


def add_derived(rows: list[dict], bandwidth: float | None) -> list[dict]:
    """Each row with ``ratio`` (to the uncapped baseline of the same model, size and steps) and ``floor_seconds``."""
    baselines = _baselines(rows)
    out = []
    for row in rows:
        row = dict(row)
        base = baselines.get(_key(row))
        compute = base["seconds"] if base else None
        ok = row.get("status") == "ok" and row.get("seconds")
        row["ratio"] = row["seconds"] / compute if ok and compute else None
        activations = activation_reserve(row.get("width") or 1024, row.get("height") or 1024)
        denoiser = row.get("denoiser_fp16_bytes") or (base or {}).get("denoiser_fp16_bytes")
        row["floor_seconds"] = streaming_floor(
            compute, denoiser, row.get("cap_bytes"), activations, row.get("steps") or 0, bandwidth
        )
        # NVML's device-wide use above what the worker's own CUDA context held before loading: what the cap does not
        # limit (non-PyTorch memory) comes on top of peak reserved here.
        nvml, first = row.get("nvml_peak"), row.get("nvml_baseline")
        row["nvml_above_baseline"] = nvml - first if nvml is not None and first is not None else None
        out.append(row)
    return out


_COLUMNS = (
    ("model", "model"), ("size", "size"), ("recipe", "recipe"), ("cap", "cap GiB"), ("s", "s/img"),
    ("ratio", "×none"), ("floor", "floor s"), ("step", "step s"), ("replay", "replay s"), ("alloc", "peak alloc GiB"),
    ("reserved", "peak rsrv GiB"), ("pred", "predicted GiB/s"),
    ("nvml", "NVML peak GiB"), ("host", "host RSS GiB"), ("status", "status"),
)
# shown when a row has LoRAs: count × rank and the adapters' bytes in the pipeline, and the median set switch
_LORA_COLUMNS = (("loras", "LoRAs"), ("switch", "switch s"))


def _columns(rows: list[dict]) -> tuple:
    if not any(r.get("loras") for r in rows):
        return _COLUMNS
    return _COLUMNS[:3] + _LORA_COLUMNS + _COLUMNS[3:]


def _lora_cell(row: dict) -> str:
    if not row.get("loras"):
        return "—"
    rank = f"×r{row['lora_rank']}" if row.get("lora_rank") else ""
    size = f" {format_bytes(row['adapter_bytes'])}" if row.get("adapter_bytes") else ""
    return f"{row['loras']}{rank}{size}"


def _cells(row: dict) -> dict[str, str]:
    def num(value, fmt):
        return "—" if value is None else format(value, fmt)

    recipe = row.get("recipe", "?")
    if recipe == "mlnb-auto" and row.get("level"):
        recipe += f"→{row['level']}"
    status = row.get("status", "error")
    if row.get("timed_out"):
        status = "timed out"
    elif status != "ok" and row.get("phase"):
        status += f" ({row['phase']})"
    return {
        "model": str(row.get("model", "?")),
        "size": _size(row.get("width"), row.get("height")),
        "recipe": recipe,
        "cap": cap_text(row.get("cap_bytes")),
        "s": num(row.get("seconds"), ".2f"),
        "ratio": num(row.get("ratio"), ".2f"),
        "floor": num(row.get("floor_seconds"), ".2f"),
        "step": num(row.get("step_seconds"), ".3f"),
        "replay": num(row.get("replayed_step_seconds"), ".3f"),
        "pred": _predicted(row),
        "alloc": format_gib(row.get("peak_allocated"), na="—", digits=2),
        "reserved": format_gib(row.get("peak_reserved"), na="—", digits=2),
        "nvml": format_gib(row.get("nvml_peak"), na="—", digits=2),
        "host": format_gib(row.get("host_rss_peak"), na="—", digits=2),
        "status": status,
        "loras": _lora_cell(row),
        "switch": "failed" if row.get("lora_switch_error") else num(row.get("lora_switch_seconds"), ".2f"),
    }


def _size(width, height) -> str:
    if width is None or height is None:
        return "native"  # a --model of unknown size whose run ended before an image said it
    return f"{width}²" if width == height else f"{width}×{height}"


def _predicted(row: dict) -> str:
    if row.get("predicted_peak") is None:
        return "—"
    seconds = row.get("predicted_seconds")
    return f"{format_gib(row['predicted_peak'], digits=2)}/{'?' if seconds is None else format(seconds, '.2f')}"


def format_table(rows: list[dict]) -> str:
    """The results as a fixed-width text table, one line per run."""
    cells = [_cells(r) for r in rows]
    columns = _columns(rows)
    widths = {k: max([len(title)] + [len(c[k]) for c in cells]) for k, title in columns}
    left = {"model", "recipe", "status"}

    def line(values: dict[str, str]) -> str:
        return "  ".join(values[k].ljust(widths[k]) if k in left else values[k].rjust(widths[k]) for k, _ in columns).rstrip()

    header = line({k: title for k, title in columns})
    return "\n".join([header, "-" * len(header), *(line(c) for c in cells)])


def format_markdown(doc: dict) -> str:
    """A Markdown section for ``docs/benchmarks.md``: where and how it was measured, the table and the targets."""
    machine, ver = doc.get("machine", {}), doc.get("versions", {})
    names = ("torch", "diffusers", "transformers", "accelerate", "mlnb", "python")
    versions = ", ".join(f"{n} {ver.get(n)}" for n in names if ver.get(n))
    bandwidth = machine.get("h2d_bandwidth")
    lines = [
        f"- card: {machine.get('card')} (CUDA {machine.get('cuda') or 'N/A'}, driver {machine.get('driver') or 'N/A'})",
        f"- host: {machine.get('platform')}, {machine.get('cpu_count')} CPUs, "
        f"{format_bytes(machine.get('host_total_bytes'))} RAM",
        f"- pinned host-to-device bandwidth: {'N/A' if not bandwidth else f'{bandwidth / 1e9:.1f} GB/s'}",
        f"- versions: {versions}",
        f"- date: {doc.get('date')}",
        f"- command: `{doc.get('command')}`",
        "",
    ]
    cells = [_cells(r) for r in doc.get("runs", [])]
    columns = _columns(doc.get("runs", []))
    lines.append("| " + " | ".join(title for _, title in columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines += ["| " + " | ".join(c[k] for k, _ in columns) + " |" for c in cells]
    lines.append("")
    lines += [f"- {text}" for text in format_loras(doc.get("loras") or []).splitlines()]
    if doc.get("loras"):
        lines.append("")
    lines += [f"- **{t['status']}**: {t['target']} ({t['detail']})" for t in doc.get("targets", [])]
    return "\n".join(lines)


def lora_summary(rows: list[dict]) -> list[dict]:
    """Per model, size and cap with LoRA runs: each run with LoRAs beside the same recipe without them.

    mlnb keeps adapters unfused, the only mode it has. A fused adapter streams and computes exactly the base
    weights' bytes and FLOPs, so the same recipe without LoRAs under the same cap is what a fused step costs (a
    fuse, and an unfuse before the next set, come on top at each switch): ``unfused_ratio`` is the unfused run's
    seconds over it.
    """
    out = []
    for row in rows:
        if not row.get("loras"):
            continue
        alone = next((r for r in rows if not r.get("loras") and all(
            r.get(k) == row.get(k) for k in ("model", "recipe", "cap_bytes", "width", "height", "steps"))), None)
        ok = row.get("status") == "ok" and row.get("seconds")
        base_ok = alone is not None and alone.get("status") == "ok" and alone.get("seconds")
        out.append({
            "model": row.get("model"), "recipe": row.get("recipe"), "cap_bytes": row.get("cap_bytes"),
            "loras": row["loras"], "lora_rank": row.get("lora_rank"), "adapter_bytes": row.get("adapter_bytes"),
            "lora_mode": row.get("lora_mode") or "unfused", "status": row.get("status"),
            "seconds": row.get("seconds"), "step_seconds": row.get("step_seconds"),
            "switch_seconds": row.get("lora_switch_seconds"), "switch_error": row.get("lora_switch_error"),
            "without_seconds": alone.get("seconds") if alone else None,
            "without_step_seconds": alone.get("step_seconds") if alone else None,
            "unfused_ratio": row["seconds"] / alone["seconds"] if ok and base_ok else None,
        })
    return out


def format_loras(items: list[dict]) -> str:
    """One line per run with LoRAs: its time and switch, and the same recipe without LoRAs (the fused step's cost)."""
    lines = []
    for it in items:
        cap = "no cap" if it["cap_bytes"] is None else f"cap {cap_text(it['cap_bytes'])} GiB"
        head = (f"{it['model']} {it['recipe']} {cap}, {it['loras']} LoRAs"
                + (f" of rank {it['lora_rank']}" if it.get("lora_rank") else "")
                + (f" ({format_bytes(it['adapter_bytes'])})" if it.get("adapter_bytes") else "") + f", {it['lora_mode']}")
        if it["status"] != "ok" or not it.get("seconds"):
            lines.append(f"{head}: {it['status']}")
            continue
        text = f"{head}: {it['seconds']:.2f} s/img"
        if it.get("switch_seconds") is not None:
            text += f", switch {it['switch_seconds']:.2f} s"
        elif it.get("switch_error"):
            text += f", switch failed ({it['switch_error']})"
        if it.get("unfused_ratio") is not None:
            text += (f"; without LoRAs (what fused adapters would stream and compute) {it['without_seconds']:.2f} s/img:"
                     f" unfused {it['unfused_ratio']:.2f}×")
        lines.append(text)
    return "\n".join(lines)
