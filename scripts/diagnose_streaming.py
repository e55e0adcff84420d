"""Whether a streamed step hides its copies: one budget plan under several allocator settings, side by side.

Usage:
    python scripts/diagnose_streaming.py --folder /tmp/mlnb-bench-models/sdxl [--budget 4GiB] [--size 1024]
        [--steps 8] [--json out.json]

With diffusers' group offloading hook, the streamed steps of mlnb's plans took the resident step plus the copies on an
H100 (docs/benchmarks.md, runs 3 and 4). mlnb's streamer allocates one ring per image for the denoiser's streamed
blocks, issues each copy as soon as its bytes in the ring are free and orders copies and compute by reused events. Each variant runs in a process of its own (the allocator reads its settings once):

- ``resident``: the model with everything on the GPU (level none): the compute-only step;
- ``capped``: the plan for the budget, with the budget as the process's memory cap (as ``mlnb bench`` runs it);
- ``uncapped``: the same plan with the whole card for the allocator. If the copies overlap here and not under the
  cap, the allocator still frees and reserves memory during a step;
- ``headroom``: the plan for 85% of the budget, under the budget's cap: if its step is much shorter than
  ``capped``'s although it streams more, the allocator ran short of room under the cap (each retry frees its
  cache and synchronizes the device);
- ``capped+fixed``: the cap with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False``: the allocator's fixed
  segments, which mlnb's device otherwise replaces with expandable ones where the build has them (only when asked
  for with ``--variants``). Each row says whether expandable segments were on and how often the allocator retried
  an allocation during the steps (``num_alloc_retries in steps 2..``: 0 is the target).

Prints a table and writes JSON: s/image, median step, the step the planner's schedule replay gives for the plan
(against the card's resident block timeline), copies per step at the measured bandwidth, and the overlap (0:
compute plus copies; 1: the longer of the two). Without a ``resident`` variant, the compute step is the one cached
for the card (``mlnb bench``'s baseline records it, with the block timeline). With ``--profile``, each streamed
variant also runs one 3-step generation under ``torch.profiler`` and reports how much of its copies ran under a
kernel and how long the GPU was idle (:mod:`mlnb.bench.timeline`): whether the GPU serialises the copies, or waits
for the host.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "resident": {},
    "capped": {},
    "uncapped": {},
    "headroom": {},
    "capped+fixed": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"},
}


def _child(args) -> dict:
    import mlnb
    from mlnb.device import get_device
    from mlnb.planner import Workload, card_facts, streamed_step
    from mlnb.units import parse_bytes

    device = get_device()
    if not device.is_cuda:
        return {"variant": args.child, "error": "needs a CUDA device"}
    budget = parse_bytes(args.budget)
    if args.child.startswith("capped") or args.child == "headroom":
        device.set_memory_cap(budget)
    if args.child == "resident":
        managed = mlnb.load_pipeline(args.folder, level="none", dtype="fp16", device=device)
    else:
        planned = int(budget * 0.85) if args.child == "headroom" else budget
        managed = mlnb.load_pipeline(args.folder, budget=planned, dtype="fp16", device=device)
    call = dict(steps=args.steps, width=args.size, height=args.size, seed=1)
    managed.generate("warm-up", **{**call, "steps": 2})
    counters = device.allocator_counters()
    result = managed.generate("a watercolor fox", **call)
    allocator = {k: v - counters[k] for k, v in device.allocator_counters().items()}
    allocator.update({f"{k} in steps 2..": v for k, v in result.allocator_in_steps.items()})
    plan = managed.plan
    row = {
        "variant": args.child,
        "plan": str(plan) if plan is not None else None,
        "seconds": result.seconds,
        "step_seconds": result.step_seconds,
        "peak_allocated": result.memory.peak_allocated,
        "peak_reserved": result.memory.peak_reserved,
        "streamed_bytes": plan.streamed_bytes if plan is not None else 0,
        "streamed_blocks": len(plan.streamed) if plan is not None else 0,
        "allocator": allocator,
        "expandable_segments": device.expandable_segments(),
    }
    facts = card_facts(device, managed.model_key, Workload(args.size, args.size, 1, args.steps), measure=True)
    row["bandwidth"] = facts.bandwidth
    row["compute_seconds"] = facts.step_seconds  # the card's resident step, as cached
    if plan is not None and plan.streamed and managed.plan_facts is not None:
        row["replayed_step_seconds"] = streamed_step(plan, managed.plan_facts, facts, calibrated=False)
    if args.profile and args.child != "resident":
        try:
            row["timeline"] = _profile(managed, call, args)
        except Exception as exc:  # a profiler that fails must not cost the variant's measurements
            row["timeline"] = {"error": f"{type(exc).__name__}: {exc}"}
    return row


def _profile(managed, call: dict, args) -> dict:
    """One more generation (3 steps) under the profiler (GPU activity only, so the host runs as it does unprofiled):
    how much of the streamed copies ran under a kernel, and how long the GPU sat idle."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    from mlnb.bench.timeline import read_trace, summarize

    keep = Path(args.trace_dir) if args.trace_dir else None
    folder = keep or Path(tempfile.mkdtemp())
    path = folder / f"trace-{args.child}.json.gz"
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        managed.generate("a watercolor fox", **{**call, "steps": 3})
    prof.export_chrome_trace(str(path))
    summary = summarize(read_trace(path))
    if keep is None:
        path.unlink()
    return summary


def _run_variant(name: str, args) -> dict:
    env = {**os.environ, **VARIANTS[name]}
    cmd = [sys.executable, __file__, "--child", name, "--folder", args.folder, "--budget", args.budget,
           "--size", str(args.size), "--steps", str(args.steps)]
    if args.profile:
        cmd += ["--profile"] + (["--trace-dir", args.trace_dir] if args.trace_dir else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"variant": name, "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="a diffusers folder (mlnb bench builds sd15/ and sdxl/)")
    parser.add_argument("--budget", default="4GiB")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--timeout", type=int, default=90, help="seconds per variant")
    parser.add_argument("--variants", default="resident,capped,uncapped",
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more 3-step generation of each streamed variant (mlnb.bench.timeline)")
    parser.add_argument("--trace-dir", default=None, help="keep the profiler traces here (trace-VARIANT.json.gz)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    if args.child:
        print(json.dumps(_child(args)))
        return 0

    from mlnb.planner import overlap_measured

    def save(rows: list[dict]) -> None:
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"folder": args.folder, "budget": args.budget, "size": args.size, "steps": args.steps,
                           "rows": rows}, fh, indent=1)

    rows = []
    for name in args.variants.split(","):
        try:
            rows.append(_run_variant(name, args))
        except subprocess.TimeoutExpired:
            rows.append({"variant": name, "error": f"timed out after {args.timeout} s"})
        # Each variant as it ends (a step limit that stops the run keeps the ones before it).
        done = rows[-1]
        print(f"{name}: " + (f"error: {done['error']}" if done.get("error") else
                             f"{done['seconds']:.2f} s/img, step {done['step_seconds'] or 0:.3f} s"), flush=True)
        save(rows)
    compute = next((r.get("step_seconds") for r in rows if r["variant"] == "resident" and not r.get("error")), None)
    compute = compute or next((r["compute_seconds"] for r in rows if r.get("compute_seconds")), None)
    print(f"{'variant':<18} {'s/img':>6} {'step s':>7} {'replay s':>8} {'copies s':>8} {'overlap':>7} "
          f"{'peak rsrv GiB':>13}  plan")
    for row in rows:
        if row.get("error"):
            print(f"{row['variant']:<18} error: {row['error']}")
            continue
        copies = row["streamed_bytes"] / row["bandwidth"] if row.get("bandwidth") else None
        if compute and copies and row["step_seconds"]:
            row["copies_seconds"] = copies
            row["overlap"] = overlap_measured(compute, copies, row["step_seconds"])
        print(f"{row['variant']:<18} {row['seconds']:>6.2f} {row['step_seconds'] or 0:>7.3f} "
              f"{row.get('replayed_step_seconds') or float('nan'):>8.3f} "
              f"{row.get('copies_seconds', 0):>8.3f} {row.get('overlap', float('nan')):>7.2f} "
              f"{(row['peak_reserved'] or 0) / 2**30:>13.2f}  {row['plan'] or 'level none'}")
        if row.get("allocator"):
            segments = {True: "expandable", False: "fixed"}.get(row.get("expandable_segments"), "N/A")
            print(f"{'':<18} allocator during the image ({segments} segments): "
                  + ", ".join(f"{k} {v}" for k, v in row["allocator"].items()))
        line = row.get("timeline")
        if line and line.get("error"):
            print(f"{'':<18} profile failed: {line['error']}")
        elif line and not line.get("copies"):
            print(f"{'':<18} profiled 3 steps: no pinned copies found (copies named {line.get('memcpy_names')})")
        elif line:
            rate = f" at {line['copy_bandwidth'] / 1e9:.1f} GB/s" if line.get("copy_bandwidth") else ""
            print(f"{'':<18} profiled 3 steps: {line['copies']} copies, {line['copy_seconds']:.3f} s{rate}, "
                  f"{line['hidden']:.0%} under a kernel; kernels {line['kernel_seconds']:.3f} s, "
                  f"GPU idle {line['idle_seconds']:.3f} s of {line['window_seconds']:.3f} s")
    save(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
