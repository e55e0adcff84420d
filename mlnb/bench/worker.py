"""One benchmark job in a fresh process: ``probe`` the device, ``build`` a model folder, or ``run`` one recipe.

Each recipe runs in its own process so that it starts from a fresh CUDA context with clean peak counters, no cached
allocator blocks, no pinned host buffers and no hooks left by the recipe before. The parent writes the job as JSON;
the worker writes its result as JSON next to it::

    python -m mlnb.bench.worker job.json      # reads job.json, writes job["result"]

A run that goes out of memory is a result (status ``"OOM"``), not a crash: the worker records the phase and the
message and exits normally. Only this module's caller decides what the numbers mean (:mod:`mlnb.bench.report`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["PeakSampler", "versions", "probe", "build", "build_loras", "run", "classify", "main"]


class PeakSampler:
    """Samples a reading (NVML device-wide used memory) in a thread and keeps the peak.

    Args:
        read: returns bytes, or ``None`` when not available.
        interval: seconds between samples.

    Example:
        ```python
        >>> with PeakSampler(device.device_used_bytes) as sampler:
        ...     pipe("a fox")
        >>> sampler.peak
        ```
    """

    def __init__(self, read, interval: float = 0.02) -> None:
        self.read = read
        self.interval = interval
        self.peak: int | None = None
        self.first: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlnb-bench-sampler", daemon=True)

    def sample(self) -> None:
        value = self.read()
        if value is not None:
            self.first = value if self.first is None else self.first
            self.peak = value if self.peak is None else max(self.peak, value)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def versions() -> dict[str, str | None]:
    """Installed versions of python and the packages whose behaviour the numbers depend on."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("mlnb", "torch", "diffusers", "transformers", "accelerate", "safetensors", "nvidia-ml-py", "xformers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _use(device_kind: str):
    from ..device import CpuDevice, get_device, set_device

    if device_kind == "cpu":
        set_device(CpuDevice())
    device = get_device()
    if device_kind == "cuda" and not device.is_cuda:
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return device


def probe(job: dict) -> dict:
    """Facts about the machine: card, memory, driver, CUDA, versions and pinned host-to-device bandwidth.

    With ``job["device"] == "cpu"`` nothing touches torch, so the parent can call it in-process. Asked for
    ``cuda`` on a machine without it, it reports the CPU (``"device": "cpu"``) and the parent says so in one line.
    """
    from ..device import CpuDevice

    device = CpuDevice() if job["device"] == "cpu" else _use("auto")
    info = device.info()
    bandwidth = device.h2d_bandwidth() if device.is_cuda else None
    return {
        "device": device.kind,
        "card": info.name,
        "total_bytes": info.total_bytes,
        "compute_capability": list(info.compute_capability) if info.compute_capability else None,
        "driver": info.driver_version,
        "cuda": info.cuda_version,
        "nvml_error": info.nvml_error,
        "host_total_bytes": info.host_total_bytes,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "h2d_bandwidth": bandwidth,  # bytes/s, pinned host memory to the GPU
        "versions": versions(),
    }


def build(job: dict) -> dict:
    """Build the random-weight ``job["model"]`` architecture on the device and save it to ``job["folder"]``."""
    from .models import save_arch_pipeline

    device = _use(job["device"])
    return save_arch_pipeline(job["model"], job["folder"], device=device.torch_device, seed=job.get("seed", 0))


def build_loras(job: dict) -> dict:
    """Write ``job["count"]`` random LoRAs of rank ``job["rank"]`` (and as many to switch to) for the pipeline in
    ``job["folder"]`` to ``job["out"]``, on the CPU (:func:`mlnb.bench.loras.write_loras`)."""
    from .loras import write_loras

    try:
        return write_loras(job["folder"], job["out"], job["count"], job["rank"], seed=job.get("seed", 0))
    except Exception as exc:  # a model whose denoiser has no attention projections: its LoRA runs fail, not the rest
        return {"status": "error", "error": _one_line(exc), "traceback": traceback.format_exc(limit=8)[-3000:]}


SWITCH_BUDGET_SECONDS = 20.0  # switches stop once they took this long in all (a plain recipe can take tens of seconds)


def _time_switches(device, switch, count: int) -> dict:
    """Seconds of up to ``count`` LoRA set switches in the loaded pipeline (synchronized; at least one, fewer once
    they took :data:`SWITCH_BUDGET_SECONDS` in all), and their median."""
    import statistics

    times: list[float] = []
    while len(times) < count and sum(times) < SWITCH_BUDGET_SECONDS:
        start = time.perf_counter()
        switch()
        device.synchronize()
        times.append(time.perf_counter() - start)
    return {"lora_switch_seconds": statistics.median(times), "lora_switch_times": [round(t, 4) for t in times]}


def classify(exc: BaseException, device) -> str:
    """``"OOM"`` when ``exc`` (or an exception it came from) is an out-of-memory error, ``"skipped"`` for a recipe
    that cannot run here, else ``"error"``."""
    from .recipes import RecipeSkipped

    if isinstance(exc, RecipeSkipped):
        return "skipped"
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if device.is_oom(current):
            return "OOM"
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return "error"


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")[:400]


def _measured(device, generate) -> tuple[float, object, tuple[int, int] | None]:
    from ..monitor import MemoryMonitor

    with MemoryMonitor(device) as monitor:
        start = time.perf_counter()
        images = generate()
        device.synchronize()
        seconds = time.perf_counter() - start
    size = tuple(images[0].size) if images else None
    return seconds, monitor.report, size


def run(job: dict) -> dict:
    """Run one recipe: load, one warm-up image, one timed image. Never raises for OOM or a failing recipe.

    The job gives ``model``, ``path``, ``recipe``, ``cap_bytes``, ``steps``, ``width``, ``height``, ``prompt``,
    ``seed`` and ``device``, and for a run with LoRAs ``loras`` (files), ``switch_loras``, ``lora_rank`` and
    ``lora_switches``: the LoRAs are loaded with the model, and after the timed image the pipeline switches to the
    other set and back ``lora_switches`` times in all, each switch timed. The result holds the status (``ok``, ``OOM``, ``error``, ``skipped``), the phase where
    it stopped, seconds per image, the generation's peak allocated/reserved bytes (MemoryMonitor), the NVML
    device-wide peak over the whole run, the host RSS peak of the process and the parameter counts.
    """
    from ..device import host_peak_rss, host_rss
    from .recipes import RECIPES, LoraSets, prepare

    result: dict = {k: job.get(k) for k in ("model", "recipe", "cap_bytes", "steps", "width", "height")}
    files = tuple(job.get("loras") or ())
    loras = LoraSets(files, tuple(job.get("switch_loras") or ())) if files else None
    result.update(loras=len(files), lora_rank=job.get("lora_rank") if files else None)
    if files:
        result["lora_file_bytes"] = sum(Path(f).stat().st_size for f in files)
    result.update(status="ok", phase=None, error=None, level=None, detail=None)
    phase = "setup"
    device = _use(job["device"])
    import torch

    info = device.info()  # initialises the CUDA context before the baselines are read
    result.update(device=device.kind, card=info.name, host_rss_baseline=host_rss())
    sampler = PeakSampler(device.device_used_bytes)
    prepared = None
    try:
        with sampler:
            if job.get("cap_bytes"):
                device.set_memory_cap(int(job["cap_bytes"]))
            phase = "load"
            logger.info("%s: loading %s (%s, cap %s)", job["recipe"], job["path"], device.kind, job.get("cap_bytes"))
            dtype = torch.float16 if device.is_cuda else torch.float32
            call = {k: job[k] for k in ("prompt", "steps", "width", "height", "seed")}
            start = time.perf_counter()
            prepared = prepare(RECIPES[job["recipe"]], job["path"], device, dtype, call, loras)
            result.update(load_seconds=time.perf_counter() - start, level=prepared.level, detail=prepared.detail)
            result.update(_param_counts(prepared.pipe))
            result["resident_after_load"] = device.snapshot().allocated
            logger.info("loaded in %.1f s: %s", result["load_seconds"], prepared.detail)
            phase = "warm-up"
            warm_seconds, warm, _ = _measured(device, prepared.generate)
            logger.info("warm-up image in %.2f s", warm_seconds)
            phase = "generate"
            counters = device.allocator_counters()
            seconds, timed, size = _measured(device, prepared.generate)
            if prepared.after is not None:
                prepared.after()
            result.update(warmup_seconds=warm_seconds, seconds=seconds, **prepared.stats)
            if counters:  # what the allocator had to do during the measured image (retries after freeing its cache)
                result["allocator"] = {k: v - counters[k] for k, v in device.allocator_counters().items()}
            if size is not None:  # what was really generated (the pipeline's native size when none was asked)
                result.update(width=size[0], height=size[1])
            peaks = [r.peak_allocated for r in (warm, timed) if r.peak_allocated is not None]
            reserved = [r.peak_reserved for r in (warm, timed) if r.peak_reserved is not None]
            result.update(peak_allocated=max(peaks) if peaks else None, peak_reserved=max(reserved) if reserved else None)
            phase = None
            if prepared.switch is not None and loras.other and job.get("lora_switches"):
                try:  # the images are measured: a switch that fails is its own result, not the run's
                    result.update(_time_switches(device, prepared.switch, int(job["lora_switches"])))
                except Exception as exc:
                    result["lora_switch_error"] = f"{classify(exc, device)}: {_one_line(exc)}"
                    logger.info("LoRA switch failed: %s", result["lora_switch_error"])
    except Exception as exc:
        result.update(status=classify(exc, device), phase=phase, error=_one_line(exc))
        logger.info("%s in %s: %s", result["status"], phase, result["error"])
        if result["status"] == "error":
            result["traceback"] = traceback.format_exc(limit=12)[-4000:]
    result.update(nvml_baseline=sampler.first, nvml_peak=sampler.peak, host_rss_peak=host_peak_rss())
    return result


def _param_counts(pipe) -> dict:
    import torch

    params = {}
    for name, component in getattr(pipe, "components", {}).items():
        if isinstance(component, torch.nn.Module):
            params[name] = sum(p.numel() for p in component.parameters())
    denoiser = params.get("unet", params.get("transformer", 0))
    # fp16 bytes whatever the runtime dtype (fp8 storage and fp32 on a CPU included): the targets' yardstick.
    return {"params": params, "fp16_weight_bytes": 2 * sum(params.values()), "denoiser_fp16_bytes": 2 * denoiser}


_JOBS = {"probe": probe, "build": build, "loras": build_loras, "run": run}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the worker process: ``python -m mlnb.bench.worker JOB.json``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m mlnb.bench.worker JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = _JOBS[job["job"]](job)
    out = Path(job["result"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=str))
    tmp.replace(out)  # the parent never reads a half-written result
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
