"""LoRA adapters on the tiny models: unfused (what mlnb does) against fused, per step, per switch and in exactness.

Usage:
    python scripts/bench_loras.py [--repeats 15] [--steps 8] [--rank 4] [--json loras.json]

For each tiny model ("sd", "sdxl") and two random LoRAs of the attention projections (UNet and text encoders),
it measures the median of ``--repeats`` runs of:

- the denoising loop's time per step (64×64, guidance 1, latents out) with no LoRA, one and two unfused, and the
  two fused into the weights, the four pipelines' runs interleaved;
- a switch from one LoRA set to another in the loaded pipeline: unfused with ``mlnb.pipeline.adapters.set_loras``
  (``[a]`` to ``[b]``: one adapter deleted, one read and loaded; ``[a, b]`` to ``[a, (b, 0.5)]``: weights only),
  and fused as diffusers does it (``unfuse_lora``, ``unload_lora_weights``, ``load_lora_weights``, ``fuse_lora``);
- what a fuse and unfuse of the two leaves in the base weights, in fp32 and fp16 (largest difference, and how many
  weights differ).

Prints a table and writes JSON. On a CPU and on tiny models, the times show the overheads' order, not a GPU's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _load(folder, dtype=None):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, **({"torch_dtype": dtype} if dtype else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _steps_seconds(pipes: dict, steps: int, repeats: int) -> dict:
    """Each pipeline's time per denoising step, its runs interleaved with the others' so that a machine whose load
    changes slows them alike: the median of (a ``steps``-step call less a 1-step call) / (steps - 1), which leaves
    the loop alone (the text encoding and the set-up are in both)."""
    import torch

    def call(pipe, n):
        start = time.perf_counter()
        pipe("a fox", num_inference_steps=n, width=64, height=64, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator("cpu").manual_seed(0))
        return time.perf_counter() - start

    for pipe in pipes.values():
        call(pipe, 2)  # warm-up
    per_step: dict = {name: [] for name in pipes}
    for _ in range(repeats):
        for name, pipe in pipes.items():
            per_step[name].append((call(pipe, steps) - call(pipe, 1)) / (steps - 1))
    return {name: statistics.median(times) for name, times in per_step.items()}


def _fuse_drift(folder, loras, dtype) -> dict:
    """Fuse the LoRAs into a pipeline's weights and unfuse them again: what is left in the base weights."""
    import torch

    pipe = _load(folder, dtype)
    before = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    for i, lora in enumerate(loras):
        pipe.load_lora_weights(str(lora), adapter_name=f"lora_{i}")
    pipe.set_adapters([f"lora_{i}" for i in range(len(loras))], [1.0] * len(loras))
    pipe.fuse_lora()
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    worst, changed, total = 0.0, 0, 0
    for key, old in before.items():
        diff = (after[key].float() - old.float()).abs()
        worst = max(worst, float(diff.max())) if diff.numel() else worst
        changed += int((diff > 0).sum())
        total += diff.numel()
    return {"max_abs": worst, "changed": changed, "weights": total}


def bench_kind(kind: str, root: Path, args) -> dict:
    import torch

    from mlnb.pipeline.adapters import set_loras
    from mlnb.testing import tiny_lora, tiny_pipeline

    folder = tiny_pipeline(kind, root / kind)
    a = tiny_lora(folder, root / f"{kind}-a", rank=args.rank, seed=1, text_encoder=True)
    b = tiny_lora(folder, root / f"{kind}-b", rank=args.rank, seed=2, text_encoder=True)
    out: dict = {"model": kind, "rank": args.rank}

    pipes = {name: _load(folder) for name in ("none", "one_unfused", "two_unfused", "two_fused")}
    set_loras(pipes["one_unfused"], [a])
    set_loras(pipes["two_unfused"], [a, b])
    fused = pipes["two_fused"]
    fused.load_lora_weights(str(a), adapter_name="lora_one")
    fused.load_lora_weights(str(b), adapter_name="lora_two")
    fused.set_adapters(["lora_one", "lora_two"], [1.0, 1.0])
    fused.fuse_lora()
    for name, seconds in _steps_seconds(pipes, args.steps, args.repeats).items():
        out[f"step_{name}"] = seconds

    pipe = pipes["two_unfused"]
    sets = iter([[a], [b]] * args.repeats)
    set_loras(pipe, [b])
    out["switch_unfused"] = _median_seconds(lambda: set_loras(pipe, next(sets)), 2 * args.repeats)
    set_loras(pipe, [a, b])
    weights = iter([[a, (b, 0.5)], [a, b]] * args.repeats)
    out["switch_weights_only"] = _median_seconds(lambda: set_loras(pipe, next(weights)), 2 * args.repeats)

    # diffusers' check for keys an adapter left unloaded matches its name in any key: no name inside another word
    names = iter([("lora_one", a), ("lora_two", b)] * args.repeats)
    fused.unfuse_lora()
    fused.unload_lora_weights()
    fused.load_lora_weights(str(b), adapter_name="lora_two")
    fused.fuse_lora()

    def fused_switch():
        name, file = next(names)
        fused.unfuse_lora()
        fused.unload_lora_weights()
        fused.load_lora_weights(str(file), adapter_name=name)
        fused.fuse_lora()

    out["switch_fused"] = _median_seconds(fused_switch, 2 * args.repeats)
    out["fuse_unfuse_fp32"] = _fuse_drift(folder, [a, b], torch.float32)
    out["fuse_unfuse_fp16"] = _fuse_drift(folder, [a, b], torch.float16)
    return out


def _versions() -> dict:
    import diffusers
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def _table(rows: list[dict]) -> str:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    lines = [
        "| model | step: none | one unfused | two unfused | two fused | switch unfused | weights only | switch fused "
        "| fuse+unfuse fp32: max / changed | fp16: max / changed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        drift = [f"{r[k]['max_abs']:.2g} / {r[k]['changed']} of {r[k]['weights']}" for k in ("fuse_unfuse_fp32",
                                                                                               "fuse_unfuse_fp16")]
        lines.append(
            f"| {r['model']} (rank {r['rank']}) | {ms(r['step_none'])} | {ms(r['step_one_unfused'])} | "
            f"{ms(r['step_two_unfused'])} | {ms(r['step_two_fused'])} | {ms(r['switch_unfused'])} | "
            f"{ms(r['switch_weights_only'])} | {ms(r['switch_fused'])} | {drift[0]} | {drift[1]} |"
        )
    return "\n".join(lines) + "\n(times in ms: steps per denoising step, switches per switch; medians)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory(prefix="mlnb-bench-loras-") as tmp:
        rows = [bench_kind(kind, Path(tmp), args) for kind in ("sd", "sdxl")]
    print(_table(rows))
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                 "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "versions": _versions(),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
