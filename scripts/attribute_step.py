"""Attribute a streamed SDXL denoising step to its causes, in one process: the UNet alone, resident and then placed
as the planner's plan for a budget places it, each suspect timed on its own.

Usage:
    python scripts/attribute_step.py [--steps 10] [--budget-gib 4] [--json attribute-step.json] [--trace-dir DIR]
    python scripts/attribute_step.py --tiny [--json out.json]     # the control flow on the CPU, a tiny UNet

SDXL's UNet (real shapes, random fp16 weights filled as ``mlnb bench`` fills them) at 1024², CFG batch 2, with a
two-op update between forwards in place of the scheduler; no text encoders, no VAE, nothing read from disk. What
each letter answers:

 R  resident, uncapped: the GPU's step (device marks at the step ends), the host's time to issue it (nothing waited
    for), and the same step replayed from a CUDA graph. Host issue close to the GPU step and a graph well below it:
    the step is launch-bound, and every µs of host work per streamed unit adds to it.
 B  one resident forward block by block (mlnb.planner.BlockTimer) -> the planner's plan for the budget
    (plan_for_budget with SDXL's encoder and VAE bytes, and the card facts measured here: probe bandwidth, step,
    block timeline, host issue time, loop reserve) and the step its schedule replay predicts.
 C  copy-only: each streamed unit's packed pinned region copied to its place in the streamer's ring, back to back
    on the copy stream, nothing computing, against the device's probe (h2d_bandwidth). Well below the probe: the
    packed regions copy slowly (pinning, NUMA, IOMMU), whatever the schedule.
 U  the plan applied as mlnb applies it (mlnb.planner.apply_plan), uncapped: the step, the host's time inside the
    streamer's per-unit hook methods per step, the allocator's counters over the steps, and the largest difference
    between the streamed output and the resident one for the same inputs (``max_abs_diff``).
 K  the same under the budget as the process's memory cap (as ``mlnb bench`` runs it). K well above U with
    allocator retries or device frees: the allocator under the cap; K close to U close to B's replay plus the hooks:
    the schedule and the host work explain the step.
 T  two capped steps under torch.profiler (mlnb.bench.timeline): copy time and its share under kernels, GPU idle.
 X  gc.collect() with the model loaded; an empty_cache (as mlnb's cleanup runs it) of ~7 GiB of cached blocks, and
    growing them again: what a per-image cache clear costs that image and the next.

With ``--tiny``, a UNet of SDXL's layout at tiny widths in fp32 on the CPU, every unit but the first streamed (its
blocks are all below the planner's smallest streamed block), no cap, no CUDA graph, the profiler on the CPU; the
SDXL plan is made from SDXL's shapes on the meta device, not applied. It checks the control flow, not a card.
Prints a table and writes JSON (after every section: a time limit keeps the sections done) with the machine,
versions, date and command.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from provenance import provenance, write_json

MiB, GiB = 2**20, 2**30
# SDXL's UNet layout at tiny widths, for --tiny (SDXL's arch config with these entries replaced)
TINY_UNET = dict(block_out_channels=[32, 64, 128], attention_head_dim=[1, 2, 4], cross_attention_dim=64,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 6 * 8)
NOMINAL_BANDWIDTH = 25e9  # bytes/s standing in for the probe on the CPU
# what an image's loop and decode leave cached (X): 30 decode-sized and 100 loop-sized blocks, ~7 GiB on a GPU
CACHED_BLOCKS = [200 * MiB] * 30 + [10 * MiB] * 100
TINY_CACHED_BLOCKS = [2 * MiB] * 30 + [128 * 1024] * 100


def build_unet(tiny: bool, device: str):
    """SDXL's UNet (or its tiny stand-in) with random weights filled on ``device`` as the bench fills them."""
    import torch
    from diffusers import UNet2DConditionModel

    from mlnb.bench.models import _materialize, load_arch

    config = {k: v for k, v in load_arch("sdxl")["unet"].items() if not k.startswith("_")}
    if tiny:
        config.update(TINY_UNET)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    dtype = torch.float32 if tiny else torch.float16
    _materialize(unet, device, dtype, torch.Generator(device=device).manual_seed(0))
    return unet.eval(), dtype


def inputs(tiny: bool, dtype, device: str, seed: int) -> dict:
    """One denoising step's inputs at 1024² (tiny: 128²), CFG batch 2."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    side, ctx, pooled = (16, 64, 64) if tiny else (128, 2048, 1280)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return dict(x=rand(2, 4, side, side), t=torch.tensor([500.0, 500.0], device=device), ctx=rand(2, 77, ctx),
                added={"text_embeds": rand(2, pooled), "time_ids": rand(2, 6)})


def forward(unet, io):
    return unet(io["x"], io["t"], io["ctx"], added_cond_kwargs=io["added"], return_dict=False)[0]


def step(unet, io) -> None:
    """One forward, CFG and an Euler-like update of the latents in place."""
    import torch

    uncond, cond = forward(unet, io).chunk(2)
    x1 = io["x"][:1] - 0.01 * (uncond + 5.0 * (cond - uncond))
    io["x"].copy_(torch.cat([x1, x1]))


class HostMeter:
    """The host's time inside the streamer's per-unit hook methods, per step: ``_enter`` (as a unit starts: its
    group's wait for the copies) and ``_leave`` (as it ends: its group's mark and the copies the ring now has room
    for). The streamer's diffusers hooks call them through the streamer, so wrappers set on the instance run."""

    def __init__(self, streamer) -> None:
        self.reset()
        for name in ("_enter", "_leave"):
            setattr(streamer, name, self._timed(getattr(streamer, name)))

    def _timed(self, real):
        def timed(unit) -> None:
            began = time.perf_counter()
            try:
                real(unit)
            finally:
                self.seconds += time.perf_counter() - began
                self.calls += 1

        return timed

    def reset(self) -> None:
        self.seconds, self.calls, self.steps = 0.0, 0, 0

    def per_step(self) -> dict:
        steps = max(1, self.steps)
        return {"hook_host_ms_per_step": self.seconds / steps * 1e3, "hook_calls_per_step": self.calls / steps}


def timed_steps(unet, io, n: int, device, meter: HostMeter | None = None) -> dict:
    """``n`` steps: the median step on the device's clock, the median host time to issue one (no wait), the
    allocator's counters over the steps and its peak reserved."""
    counters = device.allocator_counters()
    device.reset_peak()
    marks, issue = [device.timing_mark()], []
    for _ in range(n):
        if meter is not None:
            meter.steps += 1
        began = time.perf_counter()
        step(unet, io)
        issue.append(time.perf_counter() - began)
        marks.append(device.timing_mark())
    device.synchronize()
    gpu = [device.seconds_between(a, b) for a, b in zip(marks, marks[1:])]
    after = device.allocator_counters()
    peak = device.peak_reserved_bytes()
    return {
        "gpu_step_ms": statistics.median(gpu[1:] or gpu) * 1e3,
        "host_issue_ms": statistics.median(issue[1:] or issue) * 1e3,
        "allocator": {k: v - counters.get(k, 0) for k, v in after.items()},
        "peak_reserved_gib": None if peak is None else peak / GiB,
        **(meter.per_step() if meter is not None else {}),
    }


def graph_step_ms(unet, io, n: int) -> float:
    """The step replayed from a CUDA graph: the GPU's time with no launch overhead."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(unet, io)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(unet, io)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / n


def tiny_plan(facts):
    """Every unit of a tiny UNet but the first streamed through two slots, so that units share the ring's bytes
    and are copied at every step: the control flow, not a planner's choice."""
    from mlnb.planner import Plan

    streamed = tuple(b.name for b in facts.blocks[1:])
    resident = tuple(b.name for b in facts.blocks if b.name not in streamed)
    nbytes = sum(b.nbytes for b in facts.blocks if b.name in streamed)
    return Plan(budget=0, strategy="stream", resident=resident, streamed=streamed, offload_encoders_vae=False,
                fp8=False, vae_tile=None, predicted_peak=0, predicted_seconds=None, streamed_bytes=nbytes,
                notes=("tiny: every unit but the first, not a planner's plan",))


def describe_plan(plan, facts, card) -> dict:
    """The plan, the step its schedule replay gives against ``card``, and the card facts it was made from."""
    from mlnb.planner import streamed_step

    replay = streamed_step(plan, facts, card, calibrated=False)
    timeline, host = card.block_timeline, card.host_forward_seconds
    return {
        "summary": plan.summary(), "budget_gib": plan.budget / GiB, "units": len(plan.streamed),
        "streamed_mib": plan.streamed_bytes / MiB, "slots": plan.slots, "fp8": plan.fp8, "vae_tile": plan.vae_tile,
        "decode_offload_units": len(plan.decode_offload), "predicted_peak_gib": plan.predicted_peak / GiB,
        "replay_ms": None if replay is None else replay * 1e3, "probe_gbps": card.bandwidth / 1e9,
        "copies_ms_at_probe": plan.streamed_bytes / card.bandwidth * 1e3,
        "timeline_forward_ms": timeline[0] * 1e3 if timeline else None,
        "host_forward_ms": None if host is None else host * 1e3, "notes": list(plan.notes),
    }


def copy_only(streamer, copies, onload_device, cuda: bool, repeats: int = 3) -> dict:
    """Every streamed unit's packed host region copied to its place in the ring (the streamer's layout), in running
    order on the streamer's copy stream, ``repeats`` times, with nothing computing. The ring's memory is taken from
    the streamer as it releases it (its prefetched copies waited for, its units pointed home), so these copies
    overwrite nothing a forward reads; the next forward allocates a ring again and fills it afresh."""
    import torch

    ring = streamer.ring
    streamer.release()
    if ring is None:  # no phase was running: memory of the ring's size
        ring = copies.device_buffer(streamer.ring_bytes, onload_device)
    pairs, moved, per_step = [], 0, 0
    for position, name in enumerate(streamer.order):
        region = streamer.units[name].region
        if region is None:  # left in the weight files' mapping: not a packed region
            continue
        at = 0
        for start, size in streamer.layout.pieces(position):
            pairs.append((ring[start:start + size], region[at:at + size]))
            at += size
        moved += at
        per_step += at if streamer.layout.shared(position) else 0  # copied again at every step
    stream, began = streamer.stream, time.perf_counter()
    if cuda:  # the copy stream's own clock
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
    for _ in range(repeats):
        for dst, src in pairs:
            copies.issue_copy(stream, dst, src)
    if cuda:
        end.record(stream)
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        seconds = time.perf_counter() - began
    del ring, pairs
    rate = moved * repeats / seconds
    return {"gbps": rate / 1e9, "packed_mib": moved / MiB, "copied_per_step_mib": per_step / MiB,
            "ms_per_step": per_step / rate * 1e3, "pinned": all(h.is_pinned() for h in streamer.host_copies())}


def profile_steps(unet, io, n: int, cuda: bool, folder: Path) -> dict:
    """``n`` steps under torch.profiler (the GPU's activity; the CPU's with --tiny), summarized by
    :mod:`mlnb.bench.timeline`; the trace is kept in ``folder``."""
    from torch.profiler import ProfilerActivity, profile

    from mlnb.bench.timeline import read_trace, summarize

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "trace-capped.json.gz"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step(unet, io)
        if cuda:
            import torch

            torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))
    return {**summarize(read_trace(path)), "trace": str(path)}


def cleanup_costs(device, blocks: list[int], onload_device: str) -> dict:
    """gc.collect() now; then ``blocks`` allocated and freed (cached by the allocator), the device's cache clear
    (synchronize, empty_cache, ipc_collect: mlnb's cleanup), and the same blocks allocated again."""
    import torch

    began = time.perf_counter()
    gc.collect()
    out = {"gc_collect_s": time.perf_counter() - began, "cached_gib": sum(blocks) / GiB}

    def grow() -> float:
        began = time.perf_counter()
        held = [torch.empty(size, dtype=torch.uint8, device=onload_device) for size in blocks]
        device.synchronize()
        del held  # cached by the allocator from here on
        return time.perf_counter() - began

    grow()
    began = time.perf_counter()
    out["empty_cache_ran"] = device.empty_cache()
    out["empty_cache_s"] = time.perf_counter() - began
    out["regrow_s"] = grow()
    return out


def _ms(value) -> str:
    return "—" if value is None else f"{value:.1f} ms"


def table(out: dict) -> str:
    """The short table: one line a section, from the JSON (a partial one too)."""
    r, b, c, t, x = (out.get(key) or {} for key in ("R_resident", "B_plan", "C_copy_only", "T_trace", "X_cleanup"))
    rows = []
    if r:
        rows.append(("R resident", f"GPU step {_ms(r.get('gpu_step_ms'))} · host issue {_ms(r.get('host_issue_ms'))}"
                                   f" · CUDA graph {_ms(r.get('graph_step_ms'))}"))
    if b:
        rows.append(("B plan", f"{b['summary']} · replay {_ms(b['replay_ms'])} · copies at the probe "
                               f"{_ms(b['copies_ms_at_probe'])} ({b['probe_gbps']:.1f} GB/s)"))
    if c:
        rows.append(("C copy only", f"{c['gbps']:.1f} GB/s from the packed regions (pinned: {c['pinned']}) · "
                                    f"{c['copied_per_step_mib']:.0f} MiB a step in {_ms(c['ms_per_step'])}"))
    for key, label in (("U_streamed_uncapped", "U streamed"), ("K_streamed_capped", "K capped")):
        s = out.get(key) or {}
        alloc = s.get("allocator") or {}
        parts = [f"step {_ms(s.get('gpu_step_ms'))}", f"host issue {_ms(s.get('host_issue_ms'))} "
                 f"({_ms(s.get('host_added_ms'))} over resident)", f"hooks {_ms(s.get('hook_host_ms_per_step'))}/step"]
        if alloc:
            parts.append(f"retries {alloc.get('num_alloc_retries')}, device allocs/frees "
                         f"{alloc.get('num_device_alloc')}/{alloc.get('num_device_free')}")
        if s.get("peak_reserved_gib") is not None:
            parts.append(f"peak reserved {s['peak_reserved_gib']:.2f} GiB")
        if s.get("max_abs_diff") is not None:
            parts.append(f"max |Δ| {s['max_abs_diff']:.3g}")
        if s.get("error"):
            parts.append(f"error: {s['error']}")
        if s:
            rows.append((label, " · ".join(parts)))
    if t.get("copies"):
        rows.append(("T trace", f"copies {t['copy_seconds'] * 1e3:.1f} ms, {t['hidden']:.0%} under kernels; GPU idle "
                                f"{t['idle_seconds'] * 1e3:.1f} of {t['window_seconds'] * 1e3:.1f} ms"))
    elif t:
        rows.append(("T trace", f"no pinned copies in the trace ({t.get('memcpy_names')})"))
    if x:
        rows.append(("X cleanup", f"gc.collect {x['gc_collect_s']:.3f} s · empty_cache of {x['cached_gib']:.2f} GiB "
                                  f"{x['empty_cache_s']:.3f} s · regrow {x['regrow_s']:.3f} s"))
    if out.get("wall_s") is not None:
        rows.append(("", f"{out['wall_s']:.1f} s in all" + (f"; stopped: {out['error']}" if out.get("error") else "")))
    return "\n".join(f"{name:<12} {text}" for name, text in rows)


def run(args, out: dict, save) -> None:
    from mlnb.bench.models import build_arch_pipeline
    from mlnb.device import CpuDevice, get_device
    from mlnb.optimizer.offload import vae_needs_upcast
    from mlnb.planner import BlockTimer, CardFacts, Workload, apply_plan, denoiser_blocks, model_facts
    from mlnb.planner import module_streamer, plan_for_budget

    # The device first: on CUDA it turns on expandable segments before anything is allocated, as mlnb does.
    device = CpuDevice() if args.tiny else get_device()
    cuda = device.is_cuda
    onload = device.torch_device if cuda else "cpu"
    steps = args.steps or (3 if args.tiny else 10)
    out.update(device=device.describe()[0], tiny=args.tiny, steps=steps,
               expandable_segments=device.expandable_segments())

    # R: resident
    unet, dtype = build_unet(args.tiny, onload)
    io, probe = inputs(args.tiny, dtype, onload, 0), inputs(args.tiny, dtype, onload, 1)
    reference = forward(unet, probe).float().cpu()
    for _ in range(3):
        step(unet, io)
    device.synchronize()
    weights = device.counters().allocated
    out["R_resident"] = timed_steps(unet, io, steps, device)
    peak = device.peak_allocated_bytes()
    reserve = peak - weights if peak is not None and weights is not None else None
    out["R_resident"]["loop_reserve_mib"] = None if reserve is None else reserve / MiB
    if cuda:
        try:
            out["R_resident"]["graph_step_ms"] = graph_step_ms(unet, io, steps)
        except Exception as exc:  # capture fails on some stacks; the eager figures stand
            out["R_resident"]["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
    save()

    # B: block timeline -> the plan and its replay
    pipe = SimpleNamespace(unet=unet, components={"unet": unet})
    with BlockTimer(device, unet, denoiser_blocks(pipe)) as timer:
        for _ in range(4):  # forward 0 sets up, 1 is marked block by block, 2 and 3 time the host
            step(unet, io)
    device.synchronize()
    bandwidth = device.h2d_bandwidth() if cuda else NOMINAL_BANDWIDTH
    card = CardFacts(bandwidth=bandwidth, step_seconds=out["R_resident"]["gpu_step_ms"] / 1e3,
                     block_timeline=timer.timeline(), host_forward_seconds=timer.host_forward_seconds,
                     denoise_reserve=reserve if reserve and reserve > 0 else None)
    shapes = build_arch_pipeline("sdxl", device="meta")  # SDXL's encoders and VAE too, in no memory
    sdxl = model_facts(shapes)
    work = Workload(1024, 1024, 1, 20, vae_fp32=vae_needs_upcast(shapes))
    budget = int(args.budget_gib * GiB)
    if args.tiny:  # SDXL's plan from its shapes, the tiny UNet's blocks unknown to it: planned, not applied
        sdxl_plan = plan_for_budget(budget, sdxl, CardFacts(bandwidth=bandwidth), work)
        facts = model_facts(pipe)
        plan = tiny_plan(facts)
    else:
        facts = sdxl
        plan = sdxl_plan = plan_for_budget(budget, facts, card, work)
    out["B_plan"] = {**describe_plan(plan, facts, card), "sdxl_plan": str(sdxl_plan)}
    save()

    # U: the plan applied as mlnb applies it, uncapped
    unet.to("cpu")
    device.empty_cache()
    copies = device.streams()
    apply_plan(pipe, plan, onload, use_stream=cuda, ctx_device=device)
    streamer = module_streamer(unet)
    if streamer is None:
        raise RuntimeError(f"the plan streams nothing: {plan.summary()}")
    meter = HostMeter(streamer)
    for _ in range(4):  # the first records the order (blocking copies)
        step(unet, io)

    def streamed_steps() -> dict:
        for _ in range(3):
            step(unet, io)
        meter.reset()
        result = timed_steps(unet, io, steps, device, meter)
        result["host_added_ms"] = result["host_issue_ms"] - out["R_resident"]["host_issue_ms"]
        # the same inputs as the resident reference, once the ring has wrapped through every step so far
        result["max_abs_diff"] = (forward(unet, probe).float().cpu() - reference).abs().max().item()
        return result

    # C: copy-only bandwidth from the packed regions (the ring is released and comes back at the next step)
    out["C_copy_only"] = {**copy_only(streamer, copies, onload, cuda), "probe_gbps": bandwidth / 1e9}
    save()
    out["U_streamed_uncapped"] = {
        "chained": streamer.chained, "units": len(streamer.order or ()), "ring_mib": streamer.ring_bytes / MiB,
        "groups": len(streamer.layout.groups) if streamer.layout else None,
        "reference_max_abs": reference.abs().max().item(), **streamed_steps()}
    save()

    # K: under the budget as the process's cap; T: two of those steps profiled
    device.synchronize()
    device.empty_cache()
    if cuda:
        device.set_memory_cap(budget)
    try:
        out["K_streamed_capped"] = {"cap_gib": budget / GiB if cuda else None, **streamed_steps()}
        save()
        out["T_trace"] = profile_steps(unet, io, 2, cuda, Path(args.trace_dir))
    except Exception as exc:
        if not device.is_oom(exc):
            raise
        out.setdefault("K_streamed_capped", {})["error"] = f"out of memory: {str(exc)[:300]}"
    finally:
        if cuda:
            device.set_memory_cap(None)
    save()

    # X: cleanup costs, with the model loaded and its ring released
    streamer.release()
    device.synchronize()
    device.empty_cache()
    out["X_cleanup"] = cleanup_costs(device, TINY_CACHED_BLOCKS if args.tiny else CACHED_BLOCKS, onload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per section (default 10; --tiny 3)")
    parser.add_argument("--budget-gib", type=float, default=4.0, help="the plan's budget and K's cap")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--trace-dir", default=".", help="where T's profiler trace goes (trace-capped.json.gz)")
    parser.add_argument("--tiny", action="store_true", help="the control flow on the CPU with a tiny UNet")
    args = parser.parse_args(argv)

    import diffusers
    import torch

    import mlnb

    out: dict = provenance({"mlnb": mlnb.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__})
    began = time.perf_counter()

    def save() -> None:
        out["wall_s"] = time.perf_counter() - began
        write_json(args.json, out)

    threads = torch.get_num_threads()
    if args.tiny:  # one thread: on a busy CPU, threads that wait for each other take many times as long
        torch.set_num_threads(1)
    try:
        with torch.no_grad():
            run(args, out, save)
    except Exception as exc:  # the sections done stay in the JSON, with what stopped the rest
        out["error"] = f"{type(exc).__name__}: {exc}"[:500]
        raise
    finally:
        torch.set_num_threads(threads)
        save()
        print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
