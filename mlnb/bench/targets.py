"""The benchmark's targets and their verdicts: met, not met or not measured, with the figures behind each. Pure.

Each target names a model, an image size and a cap, or a kind of check over every run of a kind (the host RAM, the
planner's budget and predictions). A target about a model whose rows the benchmark did not produce is left out, so a
run of some models prints the verdicts of those models only. Rows carry ``ratio`` (:func:`mlnb.bench.report.add_derived`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..units import GiB, format_bytes, format_gib
from .recipes import BASELINE

__all__ = ["TRANSFORMER_MODELS", "Target", "TARGETS", "cap_text", "applies", "evaluate_targets",
           "format_targets"]

@dataclass(frozen=True)
class Target:
    """One of the goals the benchmark checks.

    Args:
        key: short id.
        text: the goal in words.
        model: the model it is about (``None``: every model).
        size: the image side in pixels.
        cap_gib: the budget, in GiB.
        max_ratio: the most seconds per image allowed, as a multiple of the uncapped no-offload run (``lora-ratio``:
            of the same model without LoRAs under the same cap).
        host_ratio: the most host RSS allowed, as a multiple of the fp16 weight bytes.
        floor_ratio: the most seconds per image allowed, as a multiple of the streaming floor.
        kind: ``ratio``, ``host``, ``floor``, the planner's ``peak``, ``time`` and ``budget`` checks, ``plain``
            (faster than every plain diffusers recipe that ran under the cap), ``host-bytes`` (host RSS of the
            target's run ≤ ``max_bytes``), ``lora-ratio`` and ``lora-switch``.
        tolerance: for ``peak`` and ``time``: the largest relative error of prediction against measurement.
        models: for the planner's checks: the models whose runs count (``None``: every model).
        stretch: a tighter ratio that is reported beside the verdict, not judged.
        max_bytes: for ``host-bytes``: the most host RSS allowed.
        max_seconds: for ``lora-switch``: the most seconds a switch may take.
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
    models: tuple[str, ...] | None = None
    stretch: float | None = None
    max_bytes: int | None = None
    max_seconds: float | None = None


TRANSFORMER_MODELS = ("sd35-medium", "sd35-large", "flux-dev")

TARGETS = (
    Target(
        "sdxl-4gib", "SDXL 1024² under a 4 GiB cap fits and takes ≤ 1.3× the uncapped no-offload time "
        "(stretch 1.15×)", "sdxl", 1024, 4, 1.3, stretch=1.15,
    ),
    Target("sd15-2gib", "SD1.5 512² under a 2 GiB cap takes ≤ 1.2× the uncapped no-offload time", "sd15", 512, 2, 1.2),
    Target(
        "sdxl-15gib", "SDXL 1024² under a 15 GiB cap takes ≤ 1.03× the uncapped no-offload time (no needless offload)",
        "sdxl", 1024, 15, 1.03,
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
    Target("plan-time", "the planner's time predicted before a plan's first image is within 15% of the measured time",
           kind="time", tolerance=0.15),
    Target("sdxl-loras-4gib", "SDXL 1024² with its LoRAs under a 4 GiB cap takes ≤ 1.1× SDXL alone under the same cap",
           "sdxl", 1024, 4, 1.1, kind="lora-ratio"),
    Target("sdxl-lora-switch", "switching between two LoRA sets in a loaded SDXL pipeline takes < 1 s (every mlnb run "
           "with LoRAs, median of its switches)", "sdxl", 1024, max_seconds=1.0, kind="lora-switch"),
    Target("sd35m-4gib", "SD3.5 medium 1024² under a 4 GiB cap takes ≤ 1.5× the uncapped no-offload time",
           "sd35-medium", 1024, 4, 1.5),
    Target("sd35m-8gib", "SD3.5 medium 1024² under an 8 GiB cap takes ≤ 1.1× the uncapped no-offload time",
           "sd35-medium", 1024, 8, 1.1),
    Target("flux-15gib", "FLUX.1-dev 1024² under a 15 GiB cap takes ≤ 1.5× the uncapped no-offload time (stretch 1.2×)",
           "flux-dev", 1024, 15, 1.5, stretch=1.2),
    Target("flux-15gib-plain", "FLUX.1-dev 1024² under a 15 GiB cap is faster than the best plain-diffusers recipe "
           "that runs under the same cap", "flux-dev", 1024, 15, kind="plain"),
    Target("flux-15gib-host", "FLUX.1-dev 1024² under a 15 GiB cap keeps the host RSS ≤ 12 GiB", "flux-dev", 1024, 15,
           max_bytes=12 * GiB, kind="host-bytes"),
    Target("dit-plan-budget", "the budget planner never exceeds its budget on SD3.5 and FLUX.1 (as plan-budget)",
           kind="budget", models=TRANSFORMER_MODELS),
    Target("dit-plan-peak", "the planner's predicted peak is within 10% of the measured peak allocated on SD3.5 and "
           "FLUX.1", kind="peak", tolerance=0.10, models=TRANSFORMER_MODELS),
    Target("dit-plan-time", "the planner's time predicted before a plan's first image is within 15% of the measured "
           "time on SD3.5 and FLUX.1", kind="time", tolerance=0.15, models=TRANSFORMER_MODELS),
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


def _runs_at(target: Target, rows: list[dict], family: str = "mlnb-", loras: bool = False) -> list[dict]:
    """The runs of ``target``'s model, size and cap of a recipe family, with LoRAs or without."""
    cap = int(target.cap_gib * GiB)
    return [
        r for r in rows
        if r.get("model") == target.model and r.get("width") == target.size and r.get("height") == target.size
        and r.get("cap_bytes") == cap and str(r.get("recipe", "")).startswith(family) and bool(r.get("loras")) == loras
    ]


def _target_row(target: Target, rows: list[dict]) -> dict | None:
    """The mlnb run without LoRAs a model/size/cap target is judged on (see :func:`_pick`)."""
    return _pick(_runs_at(target, rows))


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
    stretch = ""
    if target.stretch is not None:
        stretch = f"; stretch {target.stretch:g}×: {'met' if row['ratio'] <= target.stretch else 'not met'}"
    steps = f", {row['steps']} steps" if row.get("steps") else ""
    return verdict, (f"{name}: {row['seconds']:.2f} s/img = {row['ratio']:.2f}× (limit {target.max_ratio:g}×{stretch})"
                     f"{steps}")


def _name(row: dict) -> str:
    return row["recipe"] + (f" ({row['level']})" if row.get("level") and row["recipe"] == "mlnb-auto" else "")


def _judge_plain(target: Target, rows: list[dict]) -> tuple[str, str]:
    """The target's mlnb run against the fastest plain diffusers run (without LoRAs) under the same cap; a plain
    recipe that did not finish under the cap does not run there."""
    row = _target_row(target, rows)
    plain = [r for r in _runs_at(target, rows, "diffusers-") if r.get("status") != "skipped"]
    where = f"{target.model} {target.size}² under {target.cap_gib:g} GiB"
    if row is None or not plain:
        return "not measured", f"no {'mlnb' if row is None else 'plain diffusers'} run of {where}"
    if row.get("status") != "ok":
        return "not met", f"{_name(row)}: {_failure(row)}"
    ran = [r for r in plain if r.get("status") == "ok" and r.get("seconds")]
    others = "; ".join(f"{r['recipe']}: {_failure(r)}" for r in plain if r not in ran)
    others = f"; did not run under the cap: {others}" if others else ""
    if not ran:
        return "met", f"{_name(row)}: {row['seconds']:.2f} s/img; no plain diffusers recipe finished{others}"
    best = min(ran, key=lambda r: r["seconds"])
    verdict = "met" if row["seconds"] < best["seconds"] else "not met"
    return verdict, (f"{_name(row)}: {row['seconds']:.2f} s/img vs the fastest plain recipe, {best['recipe']}: "
                     f"{best['seconds']:.2f} s/img ({row['seconds'] / best['seconds']:.2f}×){others}")


def _judge_host_bytes(target: Target, rows: list[dict]) -> tuple[str, str]:
    row = _target_row(target, rows)
    if row is None or not row.get("host_rss_peak"):
        why = "no mlnb run" if row is None else f"{_name(row)} recorded no host RSS"
        return "not measured", f"{why} of {target.model} {target.size}² under {target.cap_gib:g} GiB"
    rss = row["host_rss_peak"]
    if row.get("status") != "ok":
        return "not met", f"{_name(row)}: {_failure(row)} (host RSS {format_bytes(rss)})"
    verdict = "met" if rss <= target.max_bytes else "not met"
    return verdict, f"{_name(row)}: host RSS peak {format_bytes(rss)} (limit {format_bytes(target.max_bytes)})"


def _lora_text(row: dict) -> str:
    rank = f" of rank {row['lora_rank']}" if row.get("lora_rank") else ""
    size = f", {format_bytes(row['adapter_bytes'])} of adapters" if row.get("adapter_bytes") else ""
    return f"{row.get('loras')} LoRAs{rank}{size}"


def _judge_lora_ratio(target: Target, rows: list[dict]) -> tuple[str, str]:
    """The mlnb run with LoRAs against the same recipe without them, same model, size and cap. mlnb keeps adapters
    unfused; a fused adapter would stream and compute what the base weights do, so the run without LoRAs is also
    what a fused step costs (before the fuse itself at each switch)."""
    row = _pick(_runs_at(target, rows, loras=True))
    where = f"{target.model} {target.size}² under {target.cap_gib:g} GiB"
    if row is None:
        return "not measured", f"no mlnb run with LoRAs of {where}"
    alone = [r for r in _runs_at(target, rows) if r.get("recipe") == row.get("recipe")]
    base = alone[0] if alone else _target_row(target, rows)
    if row.get("status") != "ok":
        return "not met", f"{_name(row)} with {_lora_text(row)}: {_failure(row)}"
    if base is None or base.get("status") != "ok" or not base.get("seconds"):
        why = "no run" if base is None else f"{_name(base)}: {_failure(base)}"
        return "not measured", f"{target.model} alone under the same cap did not finish ({why})"
    ratio = row["seconds"] / base["seconds"]
    steps = ""
    if row.get("step_seconds") and base.get("step_seconds"):
        steps = f"; step {row['step_seconds']:.3f} s vs {base['step_seconds']:.3f} s"
    verdict = "met" if ratio <= target.max_ratio else "not met"
    return verdict, (
        f"{target.model}+{row['loras']} LoRAs {target.cap_gib:g} GiB / {target.model} {target.cap_gib:g} GiB = "
        f"{ratio:.2f}× (target ≤ {target.max_ratio:g}×): {_name(row)} {row['seconds']:.2f} s/img with "
        f"{_lora_text(row)} ({row.get('lora_mode') or 'unfused'}), {_name(base)} {base['seconds']:.2f} s/img "
        f"without{steps}"
    )


def _judge_lora_switch(target: Target, rows: list[dict]) -> tuple[str, str]:
    runs = [
        r for r in rows if r.get("model") == target.model and r.get("loras") and r.get("status") != "skipped"
        and str(r.get("recipe", "")).startswith("mlnb-")
    ]
    timed = [r for r in runs if r.get("lora_switch_seconds") is not None]
    if not timed and not any(r.get("lora_switch_error") for r in runs):
        why = "no mlnb run with LoRAs" if not runs else "no mlnb run with LoRAs timed a switch"
        return "not measured", f"{why} of {target.model}"
    parts, bad = [], False
    for r in runs:
        if r.get("lora_switch_error"):
            bad = True
            parts.append(f"{_label(r)}: the switch failed: {r['lora_switch_error']}")
        elif r.get("lora_switch_seconds") is None:
            parts.append(f"{_label(r)}: no switch timed ({_failure(r) if r.get('status') != 'ok' else 'none asked'})")
        else:
            times = r.get("lora_switch_times") or [r["lora_switch_seconds"]]
            bad = bad or r["lora_switch_seconds"] >= target.max_seconds
            parts.append(f"{_label(r)}: {r['lora_switch_seconds']:.2f} s (median of {len(times)}, "
                         f"{min(times):.2f}–{max(times):.2f} s; {r.get('loras')} LoRAs each way)")
    return ("not met" if bad else "met"), f"limit {target.max_seconds:g} s: " + "; ".join(parts)


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


def _plan_rows(rows: list[dict], models: tuple[str, ...] | None = None) -> list[dict]:
    """Runs of the budget planner, known by their recipe: ``mlnb-plan``, and ``mlnb-auto`` on CUDA (where auto is
    the planner), whether they made a plan or stopped before (an OOM while loading, a timeout), of ``models`` (None:
    every model), with LoRAs or without. The targets are only judged for a CUDA run; a row without a ``device`` (a
    run that timed out) is one of its runs."""
    return [
        r for r in rows
        if r.get("status") != "skipped" and (models is None or r.get("model") in models)
        and (r.get("recipe") == "mlnb-plan" or (r.get("recipe") == "mlnb-auto" and r.get("device") != "cpu"))
    ]


def _label(row: dict) -> str:
    cap = "no cap" if row.get("cap_bytes") is None else f"cap {cap_text(row['cap_bytes'])} GiB"
    loras = f" +{row['loras']} LoRAs" if row.get("loras") else ""
    return f"{row.get('model')} {row.get('recipe')}{loras} {cap}"


def _judge_budget(target: Target, rows: list[dict]) -> tuple[str, str]:
    """Peak reserved against the cap, which is what ``set_per_process_memory_fraction`` limits. A real card of the
    cap's size also holds the CUDA context and memory outside PyTorch: NVML's figure above the worker's baseline is
    shown beside it, not judged."""
    runs = [r for r in _plan_rows(rows, target.models) if r.get("cap_bytes")]
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
    runs = _plan_rows(rows, target.models)
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


def applies(target: Target, rows: list[dict]) -> bool:
    """Whether the rows are about ``target``: a run of its model (with LoRAs, for a LoRA target) or of one of its
    models; a target about no model in particular always applies."""
    if target.model is not None:
        lora = target.kind.startswith("lora")
        return any(r.get("model") == target.model and (not lora or r.get("loras")) for r in rows)
    return target.models is None or any(r.get("model") in target.models for r in rows)


_JUDGES = {
    "host": _judge_host, "floor": _judge_floor, "budget": _judge_budget, "peak": _judge_prediction,
    "time": _judge_prediction, "plain": _judge_plain, "host-bytes": _judge_host_bytes, "lora-ratio": _judge_lora_ratio,
    "lora-switch": _judge_lora_switch, "ratio": _judge_ratio,
}


def evaluate_targets(rows: list[dict], gpu: bool = True) -> list[dict]:
    """The status of each target the rows are about (:func:`applies`): ``met``, ``not met`` or ``not measured``,
    with the figures behind it.

    Rows must carry ``ratio`` (see :func:`mlnb.bench.report.add_derived`). Without a GPU nothing is measured: CPU
    runs of the tiny models check the harness, not the targets.
    """
    results = []
    for target in TARGETS:
        if not applies(target, rows):
            continue
        if not gpu:
            status, detail = "not measured", "CPU run of the tiny models: a harness check, not a measurement"
        else:
            status, detail = _JUDGES[target.kind](target, rows)
        results.append({"key": target.key, "target": target.text, "status": status, "detail": detail})
    return results


def format_targets(targets: list[dict]) -> str:
    """One line per target: ``[met] SDXL 1024² under ... — mlnb-auto (ultra): 3.10 s/img = 1.42×``."""
    return "\n".join(f"[{t['status']}] {t['target']}\n    {t['detail']}" for t in targets)
