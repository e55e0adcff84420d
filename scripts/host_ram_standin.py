"""Peak host RAM of loading a model and applying a budget plan, on a machine without a GPU, phase by phase.

    python scripts/host_ram_standin.py FOLDER [FOLDER...] --budget 4GiB,8GiB [--dtype fp16] [--json out.json]
        [--cards cards.json --card NAME] [--size 1024] [--mode mlnb|from-pretrained]

FOLDER is a diffusers folder (``mlnb bench`` builds random-weight fp16 SD1.5, SDXL and SD3.5 ones). Each folder and
budget runs in a process of its own (the peak is a process's). The GPU is stood in for by the meta device, and each
move to it first reads one element of every page of the tensor, as a copy to a card reads every page of the mapped
weight file. Page-locked buffers are stood in for by anonymous maps, populated whole as they are made (page-locking
makes every page of a buffer resident, the unused end of the last one included). What is left out is the CUDA context
and what the driver pins (on an H100 host the process held 0.59 GiB before loading, context included).

``--mode mlnb`` loads as ``load_pipeline(budget=...)`` does (:func:`mlnb.pipeline.mapped.read_pipeline`: weights left
in their files' mapping, cast as they are placed); ``--mode from-pretrained`` loads with diffusers'
``from_pretrained(torch_dtype=...)`` first, which casts on the host when the files hold another dtype. The plan is
made from the card facts in ``--cards`` (a ``cards.json`` that the GPU check writes) for ``--card``, or from nothing
measured.

For each run it prints the plan and the process's peak RSS (``ru_maxrss``, as ``mlnb bench`` reads it) as a multiple
of the fp16 weights and of the pinned bytes, and each phase's peak, sampled every 2 ms from ``/proc/self/status``
(anonymous memory, file pages, the shared maps standing in for pinned memory); ``--json`` writes it all.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GIB = 2**30
_FIELDS = ("RssAnon", "RssFile", "RssShmem")


def _status() -> dict[str, int]:
    found = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in _FIELDS:
                found[key] = int(rest.split()[0]) * 1024
    return found


class PhaseSampler:
    """Samples the process's resident memory every ``interval`` seconds, keeping the peak of each named phase."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.phase, self.peaks = interval, "start", {}
        self.order: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _record(self) -> None:
        sample = _status()
        total = sum(sample.values())
        phase = self.phase
        if phase not in self.peaks:
            self.order.append(phase)
        best = self.peaks.get(phase)
        if best is None or total > best["total"]:
            self.peaks[phase] = dict(sample, total=total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._record()
            time.sleep(self.interval)

    def enter(self, phase: str) -> None:
        self._record()
        self.phase = phase
        self._record()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._record()
        self._stop.set()
        self._thread.join()


def _read_every_page(tensor) -> None:
    if tensor.device.type == "cpu" and tensor.numel():
        tensor.reshape(-1)[:: max(1, 4096 // tensor.element_size())].sum()


def _stand_in_for_the_gpu() -> None:
    """Moves to ``meta`` read the tensors' pages first, as a host-to-device copy does."""
    import torch

    tensor_to, module_to = torch.Tensor.to, torch.nn.Module.to

    def to_tensor(self, *args, **kwargs):
        if str(args[0] if args else kwargs.get("device")) == "meta":
            _read_every_page(self)
        return tensor_to(self, *args, **kwargs)

    def to_module(self, *args, **kwargs):
        if str(args[0] if args else kwargs.get("device")) == "meta":
            for tensor in list(self.parameters()) + list(self.buffers()):
                _read_every_page(tensor)
        return module_to(self, *args, **kwargs)

    torch.Tensor.to, torch.nn.Module.to = to_tensor, to_module


def _mark_phases(sampler: PhaseSampler) -> None:
    """Name the phases of ``apply_plan`` after what it calls: moves to the GPU, pinning a model whole, streaming."""
    from mlnb.planner import apply

    depth = [0]

    def marked(function, name):
        def wrapper(*args, **kwargs):
            if depth[0]:  # a call inside a marked one (a move recursing into children) is part of its phase
                return function(*args, **kwargs)
            what = name(*args)
            sampler.enter(what)
            depth[0] += 1
            try:
                return function(*args, **kwargs)
            finally:
                depth[0] -= 1
                sampler.enter(f"{what} (done)")
        return wrapper

    apply.pin_whole = marked(apply.pin_whole, lambda module, *a: f"pin {type(module).__name__} whole")
    apply.stream_units = marked(apply.stream_units, lambda model, *a: f"pin streamed units of {type(model).__name__}")
    apply._move_except = marked(apply._move_except, lambda module, *a: f"move to GPU: {type(module).__name__}")


def run_one(folder: str, budget: str, dtype_name: str, mode: str, size: int | None, card_name: str | None) -> dict:
    """Load ``folder`` and apply the plan for ``budget`` in this process; the measurements as a dict."""
    import torch

    from mlnb.device import CopyStreams, CpuDevice, host_peak_rss, host_rss
    from mlnb.optimizer.offload import vae_needs_upcast
    from mlnb.pipeline.files import load_diffusers_pipeline, parse_dtype
    try:
        from mlnb.pipeline.mapped import materialize_all, read_pipeline
    except ImportError:  # the code before loading from the mapping
        read_pipeline, materialize_all = None, lambda pipe: None
    from mlnb.planner import Workload, apply_plan, card_facts, model_facts, model_key, native_size, plan_for_budget
    from mlnb.planner.host_memory import give_back_host_memory
    from mlnb.testing import FakeDevice
    from mlnb.units import parse_bytes

    class PinnedStandIn(CpuDevice, CopyStreams):  # the CPU, as its own copy streams with mapped host buffers
        def streams(self) -> CopyStreams:
            return self

        def host_buffer(self, nbytes: int):
            # populated at once, as page-locking makes every page of a buffer resident, used or not
            return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE),
                                    dtype=torch.uint8)

    dtype = parse_dtype(dtype_name)
    _stand_in_for_the_gpu()
    start = host_rss()
    with PhaseSampler() as sampler:
        _mark_phases(sampler)
        sampler.enter("from_pretrained")
        if mode == "mlnb" and read_pipeline is not None:
            pipe = read_pipeline(folder, dtype)
        else:
            pipe = load_diffusers_pipeline(folder, dtype=dtype)
        sampler.enter("plan")
        fp16 = sum(t.numel() * 2 for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                   for t in m.parameters())
        side = size or native_size(pipe)[0]
        work = Workload(side, side, 1, 20, vae_fp32=vae_needs_upcast(pipe))
        card = card_facts(FakeDevice(name=card_name), model_key(pipe, dtype), work, measure=False) \
            if card_name else None
        plan = plan_for_budget(parse_bytes(budget), model_facts(pipe), card or card_facts(CpuDevice()), work)
        report = apply_plan(pipe, plan, "meta", use_stream=False, ctx_device=PinnedStandIn())
        sampler.enter("after the plan")
        materialize_all(pipe)  # nothing is left deferred (a no-op after a plan)
        give_back_host_memory()
    peak, end = host_peak_rss(), host_rss()  # the peak as the bench reads it (ru_maxrss)
    pinned = sampler.peaks.get("after the plan", {}).get("RssShmem", 0)
    host_line = next((r.detail for r in report.results if r.technique.value == "model_cpu_offload" and r.applied), "")
    return {
        "folder": folder, "model": Path(folder).name, "budget": budget, "dtype": dtype_name, "mode": mode,
        "plan": plan.summary(), "host": host_line, "fp16_weights_bytes": fp16, "streamed_bytes": plan.streamed_bytes,
        "pinned_bytes": pinned, "rss_start": start, "rss_peak": peak, "rss_end": end,
        "peak_over_fp16_weights": round(peak / fp16, 3),
        "phases": [dict(phase=name, **sampler.peaks[name]) for name in sampler.order],
    }


def _print(result: dict) -> None:
    fp16 = result["fp16_weights_bytes"]
    print(f"\n{result['model']} {result['mode']} {result['dtype']} budget {result['budget']}: {result['plan']}")
    print(f"  peak RSS {result['rss_peak'] / GIB:.2f} GiB = {result['peak_over_fp16_weights']:.2f}× the fp16 weights "
          f"({fp16 / GIB:.2f} GiB); pinned {result['pinned_bytes'] / GIB:.2f} GiB; "
          f"{result['rss_start'] / GIB:.2f} GiB before loading, {result['rss_end'] / GIB:.2f} GiB after")
    print(f"  {'phase':<52} {'peak GiB':>8} {'anon':>6} {'file':>6} {'pinned':>6}")
    for row in result["phases"]:
        if row["phase"].endswith("(done)"):
            continue
        print(f"  {row['phase'][:52]:<52} {row['total'] / GIB:8.2f} {row['RssAnon'] / GIB:6.2f} "
              f"{row['RssFile'] / GIB:6.2f} {row['RssShmem'] / GIB:6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--budget", required=True, help="one or more, comma-separated: 4GiB,8GiB")
    parser.add_argument("--dtype", default="fp16", help="the dtype loaded (default fp16)")
    parser.add_argument("--mode", default="mlnb", help="mlnb, from-pretrained, or both comma-separated")
    parser.add_argument("--size", type=int, default=None, help="pixels a side (default: the model's native size)")
    parser.add_argument("--cards", default=None, help="a cards.json with the card facts to plan from")
    parser.add_argument("--card", default=None, help="the card's name in --cards")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child run: one JSON on stdout
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("needs Linux: the page release it measures (madvise on the mapped weight files) is Linux's",
              file=sys.stderr)
        return 2
    if bool(args.cards) != bool(args.card):
        parser.error("--cards and --card go together")
    if args.one:
        cache = tempfile.mkdtemp(prefix="mlnb-standin-")
        if args.cards:
            shutil.copy(args.cards, Path(cache) / "cards.json")
        os.environ["MLNB_CACHE"] = cache
        try:
            result = run_one(args.folders[0], args.budget, args.dtype, args.mode, args.size, args.card)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        print("RESULT " + json.dumps(result))
        return 0
    results = []
    for folder in args.folders:
        for budget in args.budget.split(","):
            for mode in args.mode.split(","):
                command = [sys.executable, __file__, folder, "--budget", budget, "--dtype", args.dtype,
                           "--mode", mode, "--one"]
                command += ["--size", str(args.size)] if args.size else []
                command += ["--cards", args.cards, "--card", args.card] if args.cards else []
                done = subprocess.run(command, capture_output=True, text=True)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if done.returncode or line is None:
                    print(f"{folder} {budget} {mode}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                    continue
                results.append(json.loads(line[len("RESULT "):]))
                _print(results[-1])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
