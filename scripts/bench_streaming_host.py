"""Host time per streamed unit: what the streamer's hooks, parameter binding and copy issue cost the host, per unit
and step, measured on the CPU.

Usage:
    python scripts/bench_streaming_host.py [--units 24] [--tensors 20] [--steps 20] [--repeats 5] [--run 1]
        [--group-share S] [--json out.json]

A model of ``--units`` units (each ``--tensors`` small tensors, a transformer block's count, of which its forward reads
one: the time is the bookkeeping, not the arithmetic) with a resident layer after every ``--run`` of them (1: after
each; 4: four streamed units in a row, as a text encoder's layers or a run of streamed blocks, which the streamer
enters and leaves as a group when they are small enough next to its ring: ``--group-share`` sets how small, 1 for
groups of any size, 0 for none) runs one phase of ``--steps`` forwards twice: as
it is, and with every unit streamed through kept GPU memory (``keep_slots=True``, as the denoiser streams), on copy
streams that issue nothing (no bytes move, so the copies' own time is left out). The difference, divided by units
and steps, is the host time the streaming adds per streamed unit; the phase includes the first forward (which records
the order and copies blocking) and the release at its end, as a generation's denoising loop does. On a GPU the same
calls also queue events and copies, which this leaves out.

Prints a table and writes JSON with the machine, versions, date and command.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time


def _copy_streams():
    from mlnb.device import CopyStreams

    class NoCopies(CopyStreams):
        """Copy streams that move nothing: the host's bookkeeping alone."""

        def issue_copy(self, stream, dst, src, *args, **kwargs):
            return kwargs.get("done") or ("copy", id(dst))

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

    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    if streamer is not None:
        streamer.release()
    return time.perf_counter() - start


def measure(units: int, tensors: int, steps: int, repeats: int, run: int = 1, group_share: float | None = None) -> dict:
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
        streamer = stream_units(model, names, torch.device("cpu"), _copy_streams(), stream=object(), keep_slots=True,
                                **shared)
        model(x)  # the order recorded before the phase, as the first image records it
        streamer.release()
        times.append(_phase(model, x, steps, streamer))
    base, streamed = min(without), min(times)  # the least disturbed run of each
    return {
        "units": units,
        "tensors_per_unit": tensors,
        "run": run,
        "groups": len(getattr(streamer.layout, "groups", ())) or None,  # None: a streamer without groups
        "steps": steps,
        "phase_seconds_unstreamed": base,
        "phase_seconds_streamed": streamed,
        "host_us_per_unit_step": (streamed - base) / (units * steps) * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=24)
    parser.add_argument("--tensors", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--run", type=int, default=1, help="streamed units in a row between resident layers")
    parser.add_argument("--group-share", type=float, default=None,
                        help="the streamer's limit on a group's bytes as a share of its ring (default: its own)")
    parser.add_argument("--label", default="", help="a name for this run in the table (e.g. the branch)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    import diffusers
    import torch

    import mlnb

    rows = [measure(args.units, t, args.steps, args.repeats, args.run, args.group_share)
            for t in sorted({2, args.tensors, 4 * args.tensors})]
    print(f"{'tensors/unit':>12} {'units':>5} {'in a row':>8} {'groups':>6} {'steps':>5} {'plain ms':>9} "
          f"{'streamed ms':>11} {'host µs/unit':>12}")
    for row in rows:
        groups = "" if row["groups"] is None else row["groups"]
        print(f"{row['tensors_per_unit']:>12} {row['units']:>5} {row['run']:>8} {groups:>6} {row['steps']:>5} "
              f"{row['phase_seconds_unstreamed'] * 1e3:>9.2f} {row['phase_seconds_streamed'] * 1e3:>11.2f} "
              f"{row['host_us_per_unit_step']:>12.1f}")
    result = {
        "label": args.label,
        "rows": rows,
        "machine": f"{platform.machine()}, {platform.processor() or 'unknown cpu'}, Python {platform.python_version()}",
        "versions": {"mlnb": mlnb.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "command": "python " + " ".join(sys.argv),
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
