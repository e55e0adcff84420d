"""Peak host RAM of loading a model and applying a budget plan, on a machine without a GPU.

    python scripts/host_ram_standin.py FOLDER --budget 4GiB [--size 1024] [--cards cards.json --card NAME]

FOLDER is a diffusers folder in fp16 (``mlnb bench`` builds random-weight SD1.5 and SDXL ones). The GPU is stood in
for by the meta device, and each move to it first reads one element of every page of the tensor, as a copy to a
card reads every page of the mapped weight file. Page-locked buffers are stood in for by anonymous maps. What is
left out is the CUDA context and what the driver pins (on run 5's H100 host the process held 0.59 GiB before loading,
context included).

The plan is made as ``load_pipeline(budget=...)`` makes it: from the card facts in ``--cards`` (a ``cards.json`` that
the GPU check writes) for the card ``--card``, or from nothing measured. Prints the plan, the peak RSS of the process
over ``from_pretrained`` and ``apply_plan`` (``ru_maxrss``, as ``mlnb bench`` reads it), and that peak as a multiple of
the fp16 weights.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sys
import tempfile
from pathlib import Path


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

    torch.Tensor.to, torch.nn.Module.to = to_tensor, module_to


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--budget", required=True, help="e.g. 4GiB")
    parser.add_argument("--size", type=int, default=None, help="pixels a side (default: the model's native size)")
    parser.add_argument("--cards", default=None, help="a cards.json with the card facts to plan from")
    parser.add_argument("--card", default=None, help="the card's name in --cards")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("needs Linux: the page release it measures (madvise on the mapped weight files) is Linux's",
              file=sys.stderr)
        return 2
    if bool(args.cards) != bool(args.card):
        parser.error("--cards and --card go together")
    cache = tempfile.mkdtemp(prefix="mlnb-standin-")
    if args.cards:
        shutil.copy(args.cards, Path(cache) / "cards.json")
    os.environ["MLNB_CACHE"] = cache

    import torch
    from diffusers import DiffusionPipeline

    from mlnb.device import CopyStreams, CpuDevice, host_peak_rss, host_rss
    from mlnb.optimizer.offload import vae_needs_upcast
    from mlnb.planner import Workload, apply_plan, card_facts, model_facts, model_key, native_size, plan_for_budget
    from mlnb.testing import FakeDevice
    from mlnb.units import parse_bytes

    class PinnedStandIn(CpuDevice, CopyStreams):  # the CPU, as its own copy streams with mapped host buffers
        def streams(self) -> CopyStreams:
            return self

        def host_buffer(self, nbytes: int):
            return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)

    _stand_in_for_the_gpu()
    start = host_rss()
    pipe = DiffusionPipeline.from_pretrained(args.folder, torch_dtype=torch.float16)
    weights = sum(t.numel() * t.element_size() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                  for t in m.parameters())
    side = args.size or native_size(pipe)[0]
    work = Workload(side, side, 1, 20, vae_fp32=vae_needs_upcast(pipe))
    card = card_facts(FakeDevice(name=args.card), model_key(pipe, torch.float16), work, measure=False) \
        if args.card else None
    plan = plan_for_budget(parse_bytes(args.budget), model_facts(pipe), card or card_facts(CpuDevice()), work)
    apply_plan(pipe, plan, "meta", use_stream=False, ctx_device=PinnedStandIn())
    peak, end = host_peak_rss(), host_rss()  # the peak as the bench reads it (ru_maxrss)
    shutil.rmtree(cache, ignore_errors=True)
    result = {"folder": args.folder, "plan": plan.summary(), "weights_bytes": weights, "rss_start": start,
              "rss_peak": peak, "rss_end": end, "peak_over_weights": round(peak / weights, 3)}
    gib = 2**30
    print(f"{plan.summary()}: peak RSS {peak / gib:.2f} GiB = {peak / weights:.2f}× the fp16 weights "
          f"({weights / gib:.2f} GiB); {start / gib:.2f} GiB before loading, {end / gib:.2f} GiB after")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
