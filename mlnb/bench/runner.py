"""Planning the benchmark's runs and running each job in its own worker process.

Planning is pure: models × recipes × caps, with the uncapped ``diffusers-none`` baseline first for each model.
Running starts ``python -m mlnb.bench.worker`` for every job, with a timeout, and turns a crash or a timeout into an
``error`` row carrying the end of the worker's log, so one bad recipe never stops the rest.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..units import GiB
from .recipes import BASELINE, Recipe

__all__ = ["RunSpec", "LoraPlan", "parse_caps", "plan_runs", "run_job", "log_tail"]

DEFAULT_PROMPT = "a watercolor fox in a snowy forest"


@dataclass(frozen=True)
class RunSpec:
    """One run of one recipe on one model under one cap (``cap_bytes=None``: the whole card)."""

    model: str
    path: str
    recipe: str
    cap_bytes: int | None
    steps: int
    width: int | None  # None: the pipeline's native size (a --model whose folder does not say)
    height: int | None
    device: str
    seed: int = 0
    prompt: str = DEFAULT_PROMPT
    loras: tuple[str, ...] = ()  # LoRA files loaded before the images (none: the model alone)
    switch_loras: tuple[str, ...] = ()  # the set switched to and back from to time a switch
    lora_rank: int | None = None
    lora_switches: int = 0  # switches timed after the images

    def label(self) -> str:
        cap = "no cap" if self.cap_bytes is None else f"cap {self.cap_bytes / GiB:g} GiB"
        size = "native size" if self.width is None or self.height is None else f"{self.width}x{self.height}"
        loras = f" +{len(self.loras)} LoRAs" if self.loras else ""
        return f"{self.model} {size} {self.recipe}{loras} {cap}"

    def job(self) -> dict:
        return dict(asdict(self), job="run")


@dataclass(frozen=True)
class LoraPlan:
    """The runs with LoRAs loaded: which recipes under which caps, and the LoRA files per model.

    Args:
        recipes: the recipes that also run with the LoRAs (beside their runs without).
        caps: caps per model for those runs (:func:`parse_caps`).
        sets: per model, the LoRA files every LoRA run loads and the set it switches to.
        rank: the LoRAs' rank (for the rows).
        switches: switches timed per LoRA run (0: none).
        recipe_caps: caps of one recipe's LoRA runs instead of ``caps`` (``--lora-recipes NAME@GiB``).
    """

    recipes: list[Recipe]
    caps: dict[str, list[int | None]]
    sets: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
    rank: int
    switches: int = 3
    recipe_caps: dict[str, list[int | None]] = field(default_factory=dict)


def parse_caps(text: str | None, models: list[str], ignore_other_models: bool = False) -> dict[str, list[int | None]]:
    """Caps per model from ``"none,4"`` (every model) or ``"sdxl:4,sdxl:15,sd15:2"`` (per model), in GiB.

    ``none`` (or ``off``, or ``0``) is the uncapped card. A model that no entry names runs uncapped only. With
    ``ignore_other_models`` (the built-in defaults) entries for models that are not being run are dropped instead of
    refused.

    Raises:
        ValueError: naming the entry that is not ``GiB``, ``none`` or ``MODEL:GiB``, or an unknown model.

    Example:
        ```python
        >>> parse_caps("sdxl:4,sd15:2,none", ["sd15", "sdxl"])
        {'sd15': [2147483648, None], 'sdxl': [4294967296, None]}
        ```
    """
    caps: dict[str, list[int | None]] = {m: [] for m in models}
    for item in (part.strip() for part in (text or "").split(",")):
        if not item:
            continue
        model, _, value = item.rpartition(":")
        targets = [model] if model else models
        if model and model not in caps and ignore_other_models:
            continue
        for target in targets:
            if target not in caps:
                raise ValueError(f"--caps entry {item!r} names model {target!r}, which is not among {', '.join(models)}")
        if value.lower() in ("none", "off", "0"):
            cap = None
        else:
            try:
                gib = float(value)
            except ValueError:
                raise ValueError(f"--caps entry {item!r}: use GiB such as 4, 'none', or MODEL:GiB such as sdxl:4") from None
            if not (math.isfinite(gib) and gib > 0):
                raise ValueError(f"--caps entry {item!r}: a cap must be a number of GiB > 0 (0, none or off: no cap)")
            cap = int(gib * GiB)
        for target in targets:
            if cap not in caps[target]:
                caps[target].append(cap)
    return {m: (c or [None]) for m, c in caps.items()}


def plan_runs(
    models: list[tuple[str, str, int, int]],
    recipes: list[Recipe],
    caps: dict[str, list[int | None]],
    steps: int,
    device: str,
    baseline: bool = True,
    seed: int = 0,
    prompt: str = DEFAULT_PROMPT,
    loras: LoraPlan | None = None,
) -> list[RunSpec]:
    """Every (model, recipe, cap) run, each model's uncapped ``diffusers-none`` baseline first.

    Args:
        models: ``(name, path, width, height)`` per model.
        recipes: the recipes to run.
        caps: caps per model (:func:`parse_caps`); on a CPU pass ``{name: [None]}``.
        steps: denoising steps per image.
        device: ``"cuda"`` or ``"cpu"``.
        baseline: add the uncapped baseline when it is not already planned (ratios need it).
        loras: the runs with LoRAs, after each model's runs without: the uncapped baseline with the LoRAs first
            (plain diffusers with them on the whole card), then each LoRA recipe under each LoRA cap. A model
            without LoRA files (``loras.sets``) gets none.
    """
    runs: list[RunSpec] = []
    for name, path, width, height in models:
        planned = [(r.name, cap) for r in recipes for cap in caps.get(name, [None])]
        if baseline and (BASELINE, None) not in planned:
            planned.insert(0, (BASELINE, None))
        planned.sort(key=lambda rc: (rc != (BASELINE, None)))  # baseline first, the rest in the given order
        for recipe, cap in planned:
            runs.append(RunSpec(name, path, recipe, cap, steps, width, height, device, seed, prompt))
        if loras is None or name not in loras.sets:
            continue
        files, switch = loras.sets[name]
        with_loras = [(BASELINE, None)] + [
            (r.name, cap) for r in loras.recipes for cap in loras.recipe_caps.get(r.name, loras.caps.get(name, [None]))
        ]
        for recipe, cap in dict.fromkeys(with_loras):
            runs.append(RunSpec(name, path, recipe, cap, steps, width, height, device, seed, prompt, tuple(files),
                                tuple(switch), loras.rank, loras.switches))
    return runs


def log_tail(path: str | os.PathLike, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file ('' if it cannot be read)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_job(job: dict, log_path: str | os.PathLike, timeout: float | None = None, launcher: list[str] | None = None) -> dict:
    """Run ``job`` in a fresh worker process and return its result.

    Args:
        job: the job (``probe``, ``build`` or ``run``); ``result`` is filled in here.
        log_path: the worker's stdout and stderr go there.
        timeout: seconds before the worker is killed.
        launcher: the command that starts a worker (default ``python -m mlnb.bench.worker``); the job file is
            appended to it.

    Returns:
        The worker's result. A worker that crashed or timed out gives ``{"status": "error", "error": ...,
        "log_tail": ...}``, with ``"timed_out": True`` when it was stopped by ``timeout``.
    """
    launcher = launcher or [sys.executable, "-m", "mlnb.bench.worker"]
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mlnb-bench-job-") as tmp:
        job = dict(job, result=str(Path(tmp) / "result.json"))
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        start = time.perf_counter()
        error = None
        timed_out = False
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run([*launcher, str(job_file)], stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
                if proc.returncode != 0:
                    error = f"worker exited with status {proc.returncode}"
            except subprocess.TimeoutExpired:
                error, timed_out = f"timed out after {timeout:g} s", True
        wall = time.perf_counter() - start
        result_file = Path(job["result"])
        if error is None and result_file.is_file():
            result = json.loads(result_file.read_text())
        else:
            result = {"status": "error", "error": error or "worker wrote no result", "log_tail": log_tail(log_path)}
            if timed_out:  # still an error (exit status 1), shown as "timed out" in the table and the targets
                result["timed_out"] = True
    result["wall_seconds"] = round(wall, 2)
    return result
