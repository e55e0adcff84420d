"""Per-cell overhead of mlnb's hooks: median time of trivial cells with and without the extension.

Usage:
    python scripts/bench_cell_hooks.py [--cells 1000] [--json out.json]

Prints a table and writes JSON. Target: the median overhead is at most 1 ms per cell on a CUDA card.
"""

from __future__ import annotations

import argparse
import statistics
import time

from provenance import provenance, write_json


def _time_cells(shell, cells: int) -> list[float]:
    times = []
    for i in range(cells):
        start = time.perf_counter()
        shell.run_cell(f"_x = {i}", store_history=True)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    from IPython.testing.globalipapp import start_ipython

    import mlnb
    from mlnb.device import get_device

    shell = start_ipython()
    _time_cells(shell, 50)  # warm-up
    without = _time_cells(shell, args.cells)
    shell.run_line_magic("load_ext", "mlnb")
    _time_cells(shell, 50)
    with_ext = _time_cells(shell, args.cells)
    shell.run_line_magic("unload_ext", "mlnb")

    med_without = statistics.median(without) * 1e3
    med_with = statistics.median(with_ext) * 1e3
    result = {
        "cells": args.cells,
        "median_ms_without": round(med_without, 3),
        "median_ms_with": round(med_with, 3),
        "median_overhead_ms": round(med_with - med_without, 3),
        "target_ms": 1.0,
        "met": med_with - med_without <= 1.0,
        "device": get_device().info().name,
        **provenance({"mlnb": mlnb.__version__, "IPython": __import__("IPython").__version__}),
    }
    print(f"{'cells':<8}{'without ext (ms)':>18}{'with ext (ms)':>16}{'overhead (ms)':>16}{'target':>9}")
    print(f"{args.cells:<8}{med_without:>18.3f}{med_with:>16.3f}{med_with - med_without:>16.3f}{'<= 1.0':>9}"
          f"  {'met' if result['met'] else 'NOT met'}")
    print(f"device: {result['device']}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
