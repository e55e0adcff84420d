"""Host time per streamed unit: what the streamer's hooks, parameter binding and copy issue cost the host, per unit
and step, measured on the CPU.

Usage:
    python scripts/bench_streaming_host.py [--units 24] [--tensors 20] [--steps 20] [--repeats 5] [--run 1]
        [--slots 2] [--group-share S] [--json out.json]

A model of ``--units`` units (each ``--tensors`` small tensors, a transformer block's count, of which its forward reads
one: the time is the bookkeeping, not the arithmetic) with a resident layer after every ``--run`` of them runs one
phase of ``--steps`` forwards twice: as it is, and with every unit streamed through kept GPU memory
(``keep_slots=True``, as the denoiser streams) of ``--slots`` units, on copy streams that issue nothing (no bytes move,
so the copies' own time is left out). The difference, divided by units and steps, is the host time the streaming adds
per streamed unit; the phase includes the first forward (which records the order and copies blocking) and the release
at its end, as a generation's denoising loop does. Times are the process's CPU time (the host's work, without the
time other processes of a shared machine take), the least of ``--repeats`` runs. On a GPU the same calls also queue
events and copies, which this leaves out.

``--run 1`` puts a resident layer after each unit; ``--run 4`` four streamed units in a row (as a text encoder's
layers or a run of streamed blocks), which the streamer enters and leaves as one group when they are small enough next
to its ring: ``--group-share`` sets how small (1: any group the ring holds; 0: none; default: the streamer's own).

Beside the time, the table counts what the noise of a shared machine cannot blur: the Python function calls the
streaming adds per unit and step (a profiled pass), and the copies, waits and marks it queues for the GPU.

Prints a table and writes JSON with the machine, versions, date and command.
"""

from __future__ import annotations

import argparse
import sys
import time

from provenance import provenance, write_json


def _copy_streams():
    from mlnb.device import CopyStreams

    class NoCopies(CopyStreams):
        """Copy streams that move nothing: the host's bookkeeping alone. Counts the calls that on a GPU each queue
        work for the device (a copy, a wait of the compute stream for one, a mark of the compute)."""

        def __init__(self) -> None:
            self.calls = {"copy": 0, "wait": 0, "mark": 0}

        def issue_copy(self, stream, dst, src, *args, **kwargs):
            self.calls["copy"] += 1
            return kwargs.get("done") or ("copy", id(dst))

        def wait_copy(self, handle) -> None:
            self.calls["wait"] += 1

        def mark_done(self, event) -> None:
            self.calls["mark"] += 1

    return NoCopies()


def _model(units: int, tensors: int, run: int):
    import torch

    class Unit(torch.nn.Module):
        """``tensors`` parameters, of which the forward reads one: the time is the streaming's, not the arithmetic's."""

        def __init__(self) -> None:
            super().__init__()
            self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(4, 4)) for _ in range(tensors))

        def forward(self, x):
            return x + self.weights[0][0]

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.streamed = torch.nn.ModuleList(Unit() for _ in range(units))
            self.resident = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(-(-units // run)))

        def forward(self, x):
            for index, unit in enumerate(self.streamed):
                x = unit(x)
                if index % run == run - 1 or index == units - 1:
                    x = self.resident[index // run](x)
            return x

    return Model()


def _phase(model, x, steps: int, streamer) -> float:
    import torch

    start = time.process_time()  # this process's CPU time: others' work on a shared machine is left out
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    if streamer is not None:
        streamer.release()
    return time.process_time() - start


def _python_calls(model, x, steps: int) -> int:
    """Python function calls in ``steps`` forwards (after two unprofiled ones): a count the machine's load cannot
    blur, where the time differences of a few microseconds drown in a shared machine's noise."""
    import cProfile
    import pstats

    import torch

    profile = cProfile.Profile()
    with torch.no_grad():
        model(x)
        model(x)
        profile.enable()
        for _ in range(steps):
            model(x)
        profile.disable()
    return pstats.Stats(profile).total_calls


def measure(units: int, tensors: int, steps: int, repeats: int, run: int = 1, group_share: float | None = None,
            slots: int = 2) -> dict:
    import torch

    from mlnb.planner import stream_units

    x = torch.randn(1, 4)
    plain = _model(units, tensors, run)
    _phase(plain, x, 2, None)  # warm-up
    without, times = [], []
    for _ in range(repeats):  # alternated, so that a busy moment of a shared machine hits both alike
        without.append(_phase(plain, x, steps, None))
        model = _model(units, tensors, run)
        names = [f"streamed.{i}" for i in range(units)]
        shared = {} if group_share is None else {"group_share": group_share}
        copies = _copy_streams()
        streamer = stream_units(model, names, torch.device("cpu"), copies, stream=object(), keep_slots=True,
                                slots=slots, **shared)
        model(x)  # the order recorded before the phase, as the first image records it
        streamer.release()
        copies.calls = dict.fromkeys(copies.calls, 0)
        times.append(_phase(model, x, steps, streamer))
    base, streamed = min(without), min(times)  # the least disturbed run of each
    # what a GPU would queue, per unit and step over the last phase (every repeat's are the same)
    device_calls = {kind: count / (units * steps) for kind, count in copies.calls.items()}
    calls = (_python_calls(model, x, steps) - _python_calls(plain, x, steps)) / (units * steps)
    streamer.release()
    return {
        "units": units,
        "tensors_per_unit": tensors,
        "run": run,
        "slots": slots,
        "groups": len(getattr(streamer.layout, "groups", ())) or None,  # None: a streamer without groups
        "steps": steps,
        "phase_seconds_unstreamed": base,
        "phase_seconds_streamed": streamed,
        "host_us_per_unit_step": (streamed - base) / (units * steps) * 1e6,
        "python_calls_per_unit_step": calls,
        "device_calls_per_unit_step": device_calls,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=24)
    parser.add_argument("--tensors", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--run", type=int, default=1, help="streamed units in a row between resident layers")
    parser.add_argument("--slots", type=int, default=2, help="the ring holds this many units")
    parser.add_argument("--group-share", type=float, default=None,
                        help="the streamer's limit on a group's bytes as a share of its ring (default: its own)")
    parser.add_argument("--label", default="", help="a name for this run in the table (e.g. the branch)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    import diffusers
    import torch

    import mlnb

    rows = [measure(args.units, t, args.steps, args.repeats, args.run, args.group_share, args.slots)
            for t in sorted({2, args.tensors, 4 * args.tensors})]
    print(f"{'tensors/unit':>12} {'units':>5} {'in a row':>8} {'groups':>6} {'steps':>5} {'plain ms':>9} "
          f"{'streamed ms':>11} {'host µs/unit':>12} {'Python calls/unit':>17} {'copies/unit':>11} {'waits/unit':>10} "
          f"{'marks/unit':>10}")
    for row in rows:
        groups = "" if row["groups"] is None else row["groups"]
        calls = row["device_calls_per_unit_step"]
        print(f"{row['tensors_per_unit']:>12} {row['units']:>5} {row['run']:>8} {groups:>6} {row['steps']:>5} "
              f"{row['phase_seconds_unstreamed'] * 1e3:>9.2f} {row['phase_seconds_streamed'] * 1e3:>11.2f} "
              f"{row['host_us_per_unit_step']:>12.1f} {row['python_calls_per_unit_step']:>17.1f} "
              f"{calls['copy']:>11.2f} {calls['wait']:>10.2f} {calls['mark']:>10.2f}")
    result = {
        "label": args.label,
        "rows": rows,
        **provenance({"mlnb": mlnb.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__}),
    }
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
