"""What the benchmark's numbers mean: ratios, the streaming floor, the targets, the table and the JSON. Pure.

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

from dataclasses import dataclass

from ..levels import activation_reserve
from ..units import GiB, format_bytes, format_gib
from .recipes import BASELINE

__all__ = [
    "FLOOR_FORMULA",
    "cap_text",
    "streamed_bytes",
    "streaming_floor",
    "add_derived",
    "Target",
    "TARGETS",
    "evaluate_targets",
    "format_table",
    "format_targets",
    "format_markdown",
]

FLOOR_FORMULA = (
    "floor = max(compute_s, max(0, denoiser_fp16_bytes - max(0, cap - activations)) * steps / h2d_bandwidth)"
)
RATIO_TOLERANCE = 0.05  # "1.0x" allows 5% run-to-run timing noise


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


@dataclass(frozen=True)
class Target:
    """One of the goals the benchmark checks.

    Args:
        key: short id.
        text: the goal in words.
        model: the model it is about (``None``: every model).
        size: the image side in pixels.
        cap_gib: the budget, in GiB.
        max_ratio: the most seconds per image allowed, as a multiple of the uncapped no-offload run.
        host_ratio: the most host RSS allowed, as a multiple of the fp16 weight bytes.
        floor_ratio: the most seconds per image allowed, as a multiple of the streaming floor.
        kind: ``ratio``, ``host``, ``floor`` or the planner's ``peak``, ``time`` and ``budget`` checks.
        tolerance: for ``peak`` and ``time``: the largest relative error of prediction against measurement.
    """

    key: str
    text: str
    model: str | None = None
    size: int | None = None
    cap_gib: float | None = None
    max_ratio: float | None = None
    host_ratio: float | None = None
    floor_ratio: float | None = None
    kind: str = "ratio"
    tolerance: float | None = None


TARGETS = (
    Target(
        "sdxl-4gib", "SDXL 1024² under a 4 GiB cap fits and takes ≤ 1.5× the uncapped no-offload time",
        "sdxl", 1024, 4, 1.5,
    ),
    Target("sd15-2gib", "SD1.5 512² under a 2 GiB cap takes ≤ 1.3× the uncapped no-offload time", "sd15", 512, 2, 1.3),
    Target(
        "sdxl-15gib", "SDXL 1024² under a 15 GiB cap takes 1.0× the uncapped no-offload time (no needless offload)",
        "sdxl", 1024, 15, 1.0 + RATIO_TOLERANCE,
    ),
    Target("host-ram", "host RAM peak ≤ 1.3× the fp16 model bytes (every mlnb run)", host_ratio=1.3, kind="host"),
    Target(
        "sdxl-4gib-floor", "SDXL 1024² under a 4 GiB cap takes ≤ 1.2× the streaming floor",
        "sdxl", 1024, 4, floor_ratio=1.2, kind="floor",
    ),
    Target("plan-budget", "the budget planner (mlnb-plan, or auto on CUDA) never exceeds its budget (PyTorch's peak "
           "reserved ≤ cap, no OOM, error or timeout; the CUDA context and non-PyTorch memory are not counted)",
           kind="budget"),
    Target("plan-peak", "the planner's predicted peak is within 10% of the measured peak allocated", kind="peak",
           tolerance=0.10),
    Target("plan-time", "the planner's time predicted before a plan's first image is within 25% of the measured time",
           kind="time", tolerance=0.25),
)


def cap_text(cap_bytes: int | None) -> str:
    """A cap in GiB as given (``4``, ``3.5``, ``0.3``), or ``none``: never rounded to a whole GiB."""
    return "none" if cap_bytes is None else f"{cap_bytes / GiB:g}"


def _failure(row: dict) -> str:
    """How a run that is not ``ok`` ended, in words: ``OOM in warm-up: ...``, ``timed out after 150 s``."""
    error = row.get("error")
    if row.get("timed_out"):
        return error or "timed out"
    where = f" in {row['phase']}" if row.get("phase") else ""
    return f"{row.get('status') or 'error'}{where}" + (f": {error}" if error else "")


def _pick(candidates: list[dict]) -> dict | None:
    """The row a target is judged on: the budget planner, else ``mlnb-auto``, else the fastest mlnb level."""
    for recipe in ("mlnb-plan", "mlnb-auto"):
        for row in candidates:
            if row.get("recipe") == recipe:
                return row
    ok = [r for r in candidates if r.get("status") == "ok" and r.get("seconds")]
    if ok:
        return min(ok, key=lambda r: r["seconds"])
    return candidates[0] if candidates else None


def _target_row(target: Target, rows: list[dict]) -> dict | None:
    """The mlnb run a model/size/cap target is judged on (see :func:`_pick`)."""
    cap = int(target.cap_gib * GiB)
    return _pick([
        r for r in rows
        if r.get("model") == target.model and r.get("width") == target.size and r.get("height") == target.size
        and r.get("cap_bytes") == cap and str(r.get("recipe", "")).startswith("mlnb-")
    ])


def _judge_ratio(target: Target, rows: list[dict]) -> tuple[str, str]:
    row = _target_row(target, rows)
    if row is None:
        return "not measured", f"no mlnb run of {target.model} {target.size}² under a {target.cap_gib:g} GiB cap"
    name = row["recipe"] + (f" ({row['level']})" if row.get("level") and row["recipe"] == "mlnb-auto" else "")
    if row.get("status") != "ok":
        return "not met", f"{name}: {_failure(row)}"
    if row.get("ratio") is None:
        return "not measured", f"{name} ran, but there is no uncapped {BASELINE} run to compare with"
    verdict = "met" if row["ratio"] <= target.max_ratio else "not met"
    return verdict, f"{name}: {row['seconds']:.2f} s/img = {row['ratio']:.2f}× (limit {target.max_ratio:g}×)"


def _judge_host(target: Target, rows: list[dict]) -> tuple[str, str]:
    # Every mlnb run that recorded a host RSS peak, finished or not: a run that failed had still used that memory.
    # One that failed before counting its parameters is measured against the model's fp16 bytes from another run.
    weights: dict = {}
    for r in rows:
        if r.get("fp16_weight_bytes"):
            weights.setdefault(r.get("model"), r["fp16_weight_bytes"])
    measured = [
        (r, r.get("fp16_weight_bytes") or weights.get(r.get("model"))) for r in rows
        if str(r.get("recipe", "")).startswith("mlnb-") and r.get("status") != "skipped" and r.get("host_rss_peak")
    ]
    measured = [(r, w) for r, w in measured if w]
    if not measured:
        return "not measured", "no mlnb run recorded a host RSS figure"
    worst, fp16 = max(measured, key=lambda rw: rw[0]["host_rss_peak"] / rw[1])
    ratio = worst["host_rss_peak"] / fp16
    verdict = "met" if ratio <= target.host_ratio else "not met"
    ended = "" if worst.get("status") == "ok" else f" ({_failure(worst)})"
    base = worst.get("host_rss_baseline")
    # The process's own RSS (python, torch, CUDA context) before loading, shown so the model's share can be read.
    above = ""
    if base:
        above = f"; {format_bytes(worst['host_rss_peak'] - base)} above the process's {format_bytes(base)} before loading"
    return verdict, (
        f"worst: {_label(worst)}{ended}: {format_bytes(worst['host_rss_peak'])} = {ratio:.2f}× "
        f"of {format_bytes(fp16)} (limit {target.host_ratio:g}×){above}"
    )


def _plan_rows(rows: list[dict]) -> list[dict]:
    """Runs of the budget planner, known by their recipe: ``mlnb-plan``, and ``mlnb-auto`` on CUDA (where auto is
    the planner), whether they made a plan or stopped before (an OOM while loading, a timeout). The targets are only
    judged for a CUDA run; a row without a ``device`` (a run that timed out) is one of its runs."""
    return [
        r for r in rows
        if r.get("status") != "skipped"
        and (r.get("recipe") == "mlnb-plan" or (r.get("recipe") == "mlnb-auto" and r.get("device") != "cpu"))
    ]


def _label(row: dict) -> str:
    cap = "no cap" if row.get("cap_bytes") is None else f"cap {cap_text(row['cap_bytes'])} GiB"
    return f"{row.get('model')} {row.get('recipe')} {cap}"


def _judge_budget(rows: list[dict]) -> tuple[str, str]:
    """Peak reserved against the cap, which is what ``set_per_process_memory_fraction`` limits. A real card of the
    cap's size also holds the CUDA context and memory outside PyTorch: NVML's figure above the worker's baseline is
    shown beside it, not judged."""
    runs = [r for r in _plan_rows(rows) if r.get("cap_bytes")]
    if not runs:
        return "not measured", "no planner run (mlnb-plan, or mlnb-auto on CUDA) under a cap"
    parts, bad = [], False
    for row in runs:
        nvml = row.get("nvml_above_baseline")
        device = "" if nvml is None else f", NVML {format_gib(nvml, digits=2)} GiB above the worker's baseline"
        if row.get("status") != "ok":
            bad = True
            parts.append(f"{_label(row)}: {_failure(row)}")
        elif row.get("peak_reserved") is None:
            bad = True
            parts.append(f"{_label(row)}: no peak reserved recorded")
        else:
            over = row["peak_reserved"] > row["cap_bytes"]
            bad = bad or over
            parts.append(f"{_label(row)}: peak reserved {format_gib(row['peak_reserved'], digits=2)} GiB"
                         f"{', over the cap' if over else ''}{device}")
    return ("not met" if bad else "met"), "; ".join(parts)


def _judge_prediction(target: Target, rows: list[dict]) -> tuple[str, str]:
    """Predicted peak against peak allocated, or the time predicted before a plan's first image against the timed
    image's seconds. The time judged is the warm-up image's prediction (``first_predicted_seconds``): the one beside
    it (``predicted_seconds``) came after the warm-up recorded its own step, decode and other times on the card, so
    it would largely check itself; it is shown, not judged. A planned run that ran out of memory fails the peak
    target (its peak was under-predicted, or it failed before it could be compared)."""
    peak = target.kind == "peak"
    field, measured_field = ("predicted_peak", "peak_allocated") if peak else ("first_predicted_seconds", "seconds")
    runs = _plan_rows(rows)
    finished = [r for r in runs if r.get("status") == "ok"]
    oom = [r for r in runs if r.get("status") == "OOM"] if peak else []
    pairs = [(r, r.get(field), r.get(measured_field)) for r in finished]
    known = [(r, p, m) for r, p, m in pairs if p and m]
    fmt = (lambda v: f"{format_gib(v, digits=2)} GiB") if peak else (lambda v: f"{v:.2f} s")
    what = "predicted peak" if peak else "time predicted before its first image"
    if not known and not oom:
        why = "no planner run finished" if not finished else f"no planner run has a {what}"
        return "not measured", why

    def after(row: dict, measured: float) -> str:  # the time predicted once the warm-up had recorded its own
        late = None if peak else row.get("predicted_seconds")
        return f"; after the warm-up {fmt(late)} ({late / measured - 1:+.0%}), not judged" if late else ""

    failed = [
        f"{_label(r)}: {_failure(r)}" + (f" (predicted {fmt(r['predicted_peak'])})" if r.get("predicted_peak") else "")
        for r in oom
    ]
    each = [f"{_label(r)}: {fmt(p)} vs {fmt(m)} ({p / m - 1:+.0%}{after(r, m)})" for r, p, m in known]
    within = all(abs(p / m - 1) <= target.tolerance for _, p, m in known)
    verdict = "met" if within and not oom and len(known) == len(pairs) else "not met"
    missing = f"; {len(pairs) - len(known)} run(s) without a {what}" if len(known) < len(pairs) else ""
    heading = "predicted vs measured" if peak else "predicted before the first image vs measured"
    return verdict, f"{heading}: {'; '.join(failed + each)}{missing}"


def _judge_floor(target: Target, rows: list[dict]) -> tuple[str, str]:
    row = _target_row(target, rows)
    if row is None:
        return "not measured", f"no mlnb run of {target.model} {target.size}² under {target.cap_gib:g} GiB"
    if row.get("status") != "ok":
        return "not met", f"{row['recipe']}: {_failure(row)}"
    if not row.get("floor_seconds"):
        return "not measured", f"{row['recipe']}: the floor is unknown (no baseline or bandwidth)"
    ratio = row["seconds"] / row["floor_seconds"]
    verdict = "met" if ratio <= target.floor_ratio else "not met"
    return verdict, f"{row['recipe']}: {row['seconds']:.2f} s vs floor {row['floor_seconds']:.2f} s = {ratio:.2f}×"


def evaluate_targets(rows: list[dict], gpu: bool = True) -> list[dict]:
    """Each target's status: ``met``, ``not met`` or ``not measured``, with the figures behind it.

    Rows must carry ``ratio`` (see :func:`add_derived`). Without a GPU nothing is measured: CPU runs of the tiny
    models check the harness, not the targets.
    """
    results = []
    for target in TARGETS:
        if not gpu:
            status, detail = "not measured", "CPU run of the tiny models: a harness check, not a measurement"
        elif target.kind == "host":
            status, detail = _judge_host(target, rows)
        elif target.kind == "floor":
            status, detail = _judge_floor(target, rows)
        elif target.kind == "budget":
            status, detail = _judge_budget(rows)
        elif target.kind in ("peak", "time"):
            status, detail = _judge_prediction(target, rows)
        else:
            status, detail = _judge_ratio(target, rows)
        results.append({"key": target.key, "target": target.text, "status": status, "detail": detail})
    return results


_COLUMNS = (
    ("model", "model"), ("size", "size"), ("recipe", "recipe"), ("cap", "cap GiB"), ("s", "s/img"),
    ("ratio", "×none"), ("floor", "floor s"), ("step", "step s"), ("replay", "replay s"), ("alloc", "peak alloc GiB"),
    ("reserved", "peak rsrv GiB"), ("pred", "predicted GiB/s"),
    ("nvml", "NVML peak GiB"), ("host", "host RSS GiB"), ("status", "status"),
)


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
    widths = {k: max([len(title)] + [len(c[k]) for c in cells]) for k, title in _COLUMNS}
    left = {"model", "recipe", "status"}

    def line(values: dict[str, str]) -> str:
        return "  ".join(values[k].ljust(widths[k]) if k in left else values[k].rjust(widths[k]) for k, _ in _COLUMNS).rstrip()

    header = line({k: title for k, title in _COLUMNS})
    return "\n".join([header, "-" * len(header), *(line(c) for c in cells)])


def format_targets(targets: list[dict]) -> str:
    """One line per target: ``[met] SDXL 1024² under ... — mlnb-auto (ultra): 3.10 s/img = 1.42×``."""
    return "\n".join(f"[{t['status']}] {t['target']}\n    {t['detail']}" for t in targets)


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
    lines.append("| " + " | ".join(title for _, title in _COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in _COLUMNS) + "|")
    lines += ["| " + " | ".join(c[k] for k, _ in _COLUMNS) + " |" for c in cells]
    lines.append("")
    lines += [f"- **{t['status']}**: {t['target']} ({t['detail']})" for t in doc.get("targets", [])]
    return "\n".join(lines)
