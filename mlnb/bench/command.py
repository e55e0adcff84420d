"""``mlnb bench``: parse the options, build the models, run every recipe in its own process, report.

The parent process never touches the GPU: a ``probe`` worker reads the card and its bandwidth, ``build`` workers
make the random-weight model folders, and one ``run`` worker per (model, recipe, cap) does the measuring.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from ..units import GiB
from . import report
from .models import ARCHS, ModelSource, model_source, native_size, tiny_source
from .recipes import RECIPES, parse_recipes
from .runner import DEFAULT_PROMPT, LoraPlan, RunSpec, parse_caps, plan_runs, run_job

__all__ = ["main", "build_parser"]

# auto is the budget planner on CUDA; plain diffusers' best streaming set-up runs beside it under the same caps.
QUICK_RECIPES = "mlnb-auto,diffusers-group-stream"  # the uncapped diffusers-none baseline is always added
# The transformer denoisers at the caps of a T4 (15 GiB) and an 8 GiB card, SD3.5 medium also at 4 GiB; --quick keeps
# one cap each: the one its target names.
QUICK_CAPS = "sdxl:4,sdxl:15,sd15:2,sd35-medium:4,sd35-large:15,flux-dev:15"
FULL_CAPS = ("sdxl:none,sdxl:4,sdxl:15,sd15:none,sd15:2,sd35-medium:none,sd35-medium:4,sd35-medium:8,sd35-medium:15,"
             "sd35-large:none,sd35-large:8,sd35-large:15,flux-dev:none,flux-dev:8,flux-dev:15")


def build_parser() -> argparse.ArgumentParser:
    """The ``mlnb bench`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="mlnb bench",
        description=textwrap.fill(
            "Benchmark mlnb's levels against plain diffusers on real architectures (SD1.5, SDXL, SD3.5, "
            "FLUX.1-dev; random weights), each recipe in its own process, optionally under a memory cap that "
            "simulates a smaller card. "
            "Without a CUDA device (or with --device cpu) it runs the tiny test models: a check of the harness, "
            "not of performance."
        ),
        epilog="recipes:\n" + "\n".join(f"  {r.name:<24}{r.description}" for r in RECIPES.values())
        + "\nSee docs/benchmarks.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"a few minutes on one GPU: 8 steps, recipes {QUICK_RECIPES} (+ baseline), caps {QUICK_CAPS}")
    parser.add_argument("--models", default="sd15,sdxl",
                        help=f"architectures to build: {', '.join(ARCHS)} (default sd15,sdxl)")
    parser.add_argument("--model", help="a real model (local diffusers folder or hub id) instead of --models")
    parser.add_argument("--recipes", help="all (default), diffusers, mlnb, or a comma list such as diffusers-none,mlnb-ultra")
    parser.add_argument("--steps", type=int, help="denoising steps per image (default 20; --quick 8; CPU 2)")
    caps = parser.add_mutually_exclusive_group()
    caps.add_argument("--caps", help="memory caps in GiB: '4,15', or per model 'sdxl:4,sd15:2'; a value of 0, none or off "
                      f"means uncapped (the whole card) (default {FULL_CAPS})")
    caps.add_argument("--cap-gib", type=float, metavar="N", help="one cap of N GiB (> 0) for every model (same as --caps N)")
    parser.add_argument("--size", type=int, help="image side in pixels (default: native, 512 for SD1.5, 1024 for the others)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto (default): CUDA if present, else the CPU harness check")
    parser.add_argument("--json", default="bench-results.json", help="where to write the results (default %(default)s)")
    parser.add_argument("--markdown", help="also write the results as a Markdown section to this file")
    parser.add_argument("--work-dir", help="keep the built model folders here and reuse them (default: a temp folder, deleted)")
    parser.add_argument("--log-dir", help="keep each worker's log here (default: a temp folder, deleted)")
    parser.add_argument("--timeout", type=float, help="seconds per run before it is stopped (default 900; --quick 300)")
    lora = parser.add_argument_group("LoRAs", "random LoRAs over the attention projections of the real shapes")
    lora.add_argument("--loras", type=int, default=0, metavar="N",
                      help="also run the --lora-recipes with N random LoRAs loaded (default 0: none)")
    lora.add_argument("--lora-rank", type=int, default=32, metavar="R", help="the LoRAs' rank (default %(default)s)")
    lora.add_argument("--lora-recipes", help="the recipes that also run with the LoRAs (default: --recipes), each "
                      "under --lora-caps or, as NAME@GiB, under that cap only; the uncapped diffusers-none run with "
                      "them is always added")
    lora.add_argument("--lora-caps", help="caps of the runs with LoRAs, as --caps (default: the caps of the others)")
    lora.add_argument("--lora-switches", type=int, default=3, metavar="K",
                      help="switches between two sets of N LoRAs timed in each loaded LoRA run (default %(default)s; "
                           "0: none)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _say(text: str) -> None:
    print(text, flush=True)


def _model_names(args) -> list[str]:
    if args.model:
        return [model_source(args.model).name]
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in ARCHS]
    if unknown or not names:
        raise ValueError(f"--models: unknown {', '.join(unknown) or '(empty)'}; use {', '.join(ARCHS)}")
    return names


def _sources(args, device: str, work: Path, logs: Path, timeout: float) -> tuple[list[ModelSource], list[dict]]:
    """The models to run and, for the built ones, how building went."""
    if args.model:
        return [model_source(args.model, args.size)], []
    names = _model_names(args)
    if device == "cpu":
        return [tiny_source(m) for m in names], []
    sources, builds = [], []
    for name in names:
        folder = work / name
        _say(f"building {name} (real shapes, random weights) in {folder} ...")
        job = {"job": "build", "model": name, "folder": str(folder), "device": device, "seed": args.seed}
        result = run_job(job, logs / f"build-{name}.log", timeout=timeout)
        builds.append(dict(result, model=name))
        if result.get("status") == "error":
            _say(f"  build failed: {result.get('error')}\n{result.get('log_tail', '')}")
        else:
            how = "reused" if result.get("reused") else f"{result.get('seconds', 0):.1f} s"
            _say(f"  {how}, {result.get('disk_bytes', 0) / GiB:.2f} GiB on disk")
        sources.append(ModelSource(name, str(folder), "arch", args.size or native_size(name), result))
    return sources, builds


def _build_loras(args, sources: list[ModelSource], failed: dict[str, str], device: str, work: Path, logs: Path,
                 timeout: float) -> tuple[dict, list[dict]]:
    """Write the random LoRAs of each model that was built (on the CPU in this process, else in a worker): the sets
    per model, and how each build went."""
    sets, builds = {}, []
    for source in sources:
        if source.name in failed:
            continue
        job = {"job": "loras", "folder": source.path, "out": str(work / f"loras-{source.name}-n{args.loras}-r{args.lora_rank}"),
               "count": args.loras, "rank": args.lora_rank, "seed": args.seed}
        _say(f"writing {args.loras} + {args.loras} random rank-{args.lora_rank} LoRAs for {source.name} ...")
        if device == "cpu":
            from .worker import build_loras

            result = build_loras(job)
        else:
            result = run_job(job, logs / f"loras-{source.name}.log", timeout=timeout)
        builds.append(dict(result, model=source.name, job="loras"))
        if result.get("status") == "error":
            _say(f"  failed: {result.get('error')}")
        else:
            _say(f"  {result.get('layers')} layers, {result.get('file_bytes', 0) / 2**20:.1f} MiB each"
                 + (" (reused)" if result.get("reused") else f", {result.get('seconds', 0):.1f} s"))
            sets[source.name] = (tuple(result["loras"]), tuple(result["switch"]))
    return sets, builds


def _lora_recipes(text: str | None, recipes: list) -> tuple[list, dict[str, list[int | None]]]:
    """``--lora-recipes``: the recipes, and the caps of those given as ``NAME@GiB`` (``diffusers-group-stream@4``)."""
    if not text:
        return recipes, {}
    names, caps = [], {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, at, cap = item.partition("@")
        (recipe,) = parse_recipes(name) if name not in ("diffusers", "mlnb", "all") else (None,)
        if recipe is None:
            raise ValueError(f"--lora-recipes {item!r}: name one recipe per entry")
        names.append(recipe.name)
        if at:
            caps.setdefault(recipe.name, []).extend(parse_caps(cap, ["x"])["x"])
    return parse_recipes(",".join(dict.fromkeys(names))), caps


def _check_model(model: str) -> None:
    """A ``--model`` that names a local folder must exist and be a diffusers pipeline (a hub id is checked when it
    loads)."""
    from ..errors import ModelNotFoundError
    from ..pipeline.files import resolve_model

    try:
        resolve_model(model)
    except ModelNotFoundError as exc:
        raise ValueError(f"--model: {exc}") from None


def _settings(args) -> tuple[str | None, str]:
    recipes = args.recipes or (QUICK_RECIPES if args.quick else None)
    # A --model has no per-architecture defaults: it runs uncapped unless --caps says otherwise.
    if args.caps or args.cap_gib is not None:
        caps = args.caps or repr(args.cap_gib)
    else:
        caps = "none" if args.model else QUICK_CAPS if args.quick else FULL_CAPS
    return recipes, caps


def _run_all(runs: list[RunSpec], failed_builds: dict[str, str], logs: Path, timeout: float, on_row) -> list[dict]:
    rows: list[dict] = []
    for index, spec in enumerate(runs, 1):
        base = {k: getattr(spec, k) for k in ("model", "recipe", "cap_bytes", "steps", "width", "height")}
        base.update(loras=len(spec.loras), lora_rank=spec.lora_rank)
        if spec.model in failed_builds:
            row = dict(base, status="error", phase="build", error=failed_builds[spec.model])
        else:
            cap = "nocap" if spec.cap_bytes is None else f"{spec.cap_bytes // 2**20}MiB"
            log = logs / f"run-{index:02d}-{spec.model}-{spec.recipe}-{cap}.log"
            row = run_job(spec.job(), log, timeout=timeout)
            row = {**base, **{k: v for k, v in row.items() if v is not None or k not in base}}
        rows.append(row)
        seconds = "" if row.get("seconds") is None else f" {row['seconds']:.2f} s/img"
        if row.get("lora_switch_seconds") is not None:
            seconds += f", LoRA switch {row['lora_switch_seconds']:.2f} s"
        level = f" ({row['level']})" if row.get("level") and spec.recipe == "mlnb-auto" else ""
        status = row.get("status")
        why = f": {row.get('error')}" if status not in ("ok",) and row.get("error") else ""
        if row.get("timed_out"):
            status, why = row.get("error") or "timed out", ""
        _say(f"[{index}/{len(runs)}] {spec.label()}{level}: {status}{seconds}{why}")
        if status == "error" and row.get("log_tail"):
            _say(row["log_tail"])
        on_row(rows)
    return rows


def _document(command, argv, date, machine, settings, builds, rows, device, complete, start) -> dict:
    """The JSON document: where, when and how it ran, then every run and the targets."""
    return {
        "schema": 1,
        "complete": complete,
        "date": date,
        "command": command,
        "argv": argv,
        "machine": {k: v for k, v in machine.items() if k not in ("versions", "wall_seconds")},
        "versions": dict(machine.get("versions", {}), cuda=machine.get("cuda"), driver=machine.get("driver")),
        "settings": settings,
        "floor_formula": report.FLOOR_FORMULA,
        "builds": builds,
        "runs": rows,
        "targets": report.evaluate_targets(rows, gpu=device == "cuda"),
        "loras": report.lora_summary(rows),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """``mlnb bench``: run the benchmark and write the table, the targets and the JSON.

    Args:
        argv: the options after ``bench`` (default ``sys.argv[1:]``); see ``mlnb bench --help``.

    Returns:
        0 when every run finished as ``ok``, ``OOM`` or ``skipped`` (an OOM under a cap is a result), 1 when a run
        or a build failed with an error, 2 for bad options.

    Example:
        ```python
        >>> from mlnb.bench import main
        >>> main(["--quick", "--json", "bench-results.json"])
        ```
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    recipes_text, caps_text = _settings(args)
    try:  # every option is checked before anything starts
        if args.cap_gib is not None and not (math.isfinite(args.cap_gib) and args.cap_gib > 0):
            raise ValueError(f"--cap-gib must be a number of GiB > 0, got {args.cap_gib:g} (for no cap: --caps none)")
        if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
            raise ValueError(f"--timeout must be a number of seconds > 0, got {args.timeout:g}")
        if args.model:
            _check_model(args.model)
        recipes = parse_recipes(recipes_text)
        explicit = bool(args.caps) or args.cap_gib is not None
        caps = parse_caps(caps_text, _model_names(args), ignore_other_models=not explicit)
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        if args.size is not None and (args.size < 64 or args.size % 8):
            raise ValueError(f"--size must be a multiple of 8 and at least 64, got {args.size}")
        if args.loras < 0 or args.lora_rank < 1 or args.lora_switches < 0:
            raise ValueError("--loras and --lora-switches must be >= 0 and --lora-rank >= 1")
        lora_recipes, recipe_caps = _lora_recipes(args.lora_recipes, recipes)
        lora_caps = parse_caps(args.lora_caps, _model_names(args)) if args.lora_caps else caps
    except ValueError as exc:
        parser.error(str(exc))
    command = "mlnb bench" + (" " + shlex.join(argv) if argv else "")
    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="mlnb-bench-"))
    logs = Path(args.log_dir) if args.log_dir else scratch / "logs"
    work = Path(args.work_dir) if args.work_dir else scratch / "models"
    timeout = args.timeout or (300.0 if args.quick else 900.0)
    try:
        if args.device == "cpu":  # nothing to isolate: no CUDA context is created
            from .worker import probe  # here: the worker module runs as a script in its own processes

            machine = probe({"device": "cpu"})
        else:
            machine = run_job({"job": "probe", "device": args.device}, logs / "probe.log", timeout=timeout)
        if machine.get("status") == "error":
            _say(f"probe failed: {machine.get('error')}\n{machine.get('log_tail', '')}")
            return 1
        device = "cuda" if machine.get("device") == "cuda" else "cpu"
        if args.device == "cuda" and device != "cuda":
            parser.error("--device cuda: torch sees no CUDA device here")
        steps = args.steps or (2 if device == "cpu" else 8 if args.quick else 20)
        sources, builds = _sources(args, device, work, logs, timeout)
        if device == "cpu":
            _say("no CUDA device: running the tiny models on the CPU (checks the harness; the numbers mean nothing)")
            if any(c is not None for cs in caps.values() for c in cs):
                _say("memory caps need a CUDA device: the CPU runs are uncapped")
            caps = {s.name: [None] for s in sources}
        else:
            bandwidth = machine.get("h2d_bandwidth")
            rate = f": pinned host-to-device {bandwidth / 1e9:.1f} GB/s" if bandwidth else ""
            _say(f"{machine.get('card')}{rate}")
        failed = {b["model"]: f"build failed: {b.get('error')}" for b in builds if b.get("status") == "error"}
        lora_plan = None
        if args.loras:
            # a model whose LoRAs could not be written runs without them; the failed build makes the exit status 1
            sets, lora_builds = _build_loras(args, sources, failed, device, work, logs, timeout)
            builds += lora_builds
            caps_with = {s.name: [None] for s in sources} if device == "cpu" else lora_caps
            lora_plan = LoraPlan(lora_recipes, caps_with, sets, args.lora_rank, args.lora_switches,
                                 {} if device == "cpu" else recipe_caps)
        models = [(s.name, s.path, s.size, s.size) for s in sources]
        runs = plan_runs(models, recipes, caps, steps, device, seed=args.seed, prompt=args.prompt, loras=lora_plan)
        settings = {
            "device": device, "quick": args.quick, "steps": steps, "recipes": [r.name for r in recipes],
            "caps": caps, "prompt": args.prompt, "seed": args.seed,
            "loras": None if lora_plan is None else {
                "count": args.loras, "rank": args.lora_rank, "switches": args.lora_switches, "mode": "unfused",
                "recipes": [r.name for r in lora_plan.recipes], "caps": lora_plan.caps, "models": sorted(lora_plan.sets),
            },
            "models": [
                {"name": s.name, "kind": s.kind, "path": s.path if s.kind == "model" else None, "size": s.size}
                for s in sources
            ],
        }
        date = _now()

        def write(raw_rows: list[dict], complete: bool) -> dict:
            # Written after every run too, so a run that is stopped from outside leaves the finished ones on disk.
            rows = report.add_derived(raw_rows, machine.get("h2d_bandwidth"))
            doc = _document(command, argv, date, machine, settings, builds, rows, device, complete, start)
            path = Path(args.json).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
            return doc

        doc = write(_run_all(runs, failed, logs, timeout, lambda rows: write(rows, complete=False)), complete=True)
        rows, targets = doc["runs"], doc["targets"]
        if args.markdown:
            Path(args.markdown).expanduser().write_text(report.format_markdown(doc) + "\n")
        _say("")
        _say(report.format_table(rows))
        if doc["loras"]:
            _say("\n" + report.format_loras(doc["loras"]))
        _say("")
        _say(report.format_targets(targets))
        _say(f"\nwrote {args.json} ({doc['seconds']:.0f} s)")
        errors = [r for r in rows if r.get("status") == "error"] + [b for b in builds if b.get("status") == "error"]
        return 1 if errors else 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
