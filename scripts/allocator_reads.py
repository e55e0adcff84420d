"""What torch's per-figure allocator reads cost in Python, against one read of the nested statistics table.

Usage:
    python scripts/allocator_reads.py [--reads 20000] [--json out.json]

``torch.cuda.memory_allocated``, ``memory_reserved``, ``max_memory_allocated`` and ``max_memory_reserved`` each
take the caching allocator's whole statistics table (``torch._C._cuda_memoryStats``) and flatten it in Python into
``memory_stats``' dotted keys, for one figure. mlnb's CUDA snapshot reads ``memory_stats_as_nested_dict`` once
instead (:meth:`mlnb.device.CudaDevice.counters`). On a machine with CUDA the script times the real calls; without
one it hands torch's own Python code a stand-in table of the same shape (the nine byte and count statistics in
three pools, the oversize entries and the counters), so it times the flattening but not the table's build in C++.
Prints CPU time per snapshot (four figures) both ways and writes JSON with the machine, versions, date and command.
"""

from __future__ import annotations

import argparse
import sys
import time

from provenance import provenance, write_json

_STATS = ("allocation", "allocated_bytes", "segment", "reserved_bytes", "active", "active_bytes", "inactive_split",
          "inactive_split_bytes", "requested_bytes")
_COUNTERS = ("num_alloc_retries", "num_ooms", "num_sync_all_streams", "num_device_alloc", "num_device_free",
             "num_oom_rejections", "max_split_size")


def _stand_in_table() -> dict:
    metrics = ("current", "peak", "allocated", "freed")
    table: dict = {name: {pool: {m: 1 << 30 for m in metrics} for pool in ("all", "large_pool", "small_pool")}
                   for name in _STATS}
    table.update({name: {m: 1 for m in metrics} for name in ("oversize_allocations", "oversize_segments")})
    table.update({name: 0 for name in _COUNTERS})
    return table


def _cpu_seconds(fn, reads: int) -> float:
    start = time.process_time()
    for _ in range(reads):
        fn()
    return (time.process_time() - start) / reads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=20000, help="snapshots timed each way")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    import torch
    import torch.cuda.memory as memory

    real = torch.cuda.is_available()
    if real:
        torch.zeros(1, device="cuda")  # the allocator initialised
    else:  # torch's own Python over a stand-in table (the same one each time: no build cost counted)
        table = _stand_in_table()
        torch._C._cuda_memoryStats = lambda device: table
        memory.is_initialized = lambda: True
        memory._get_device_index = lambda device, optional=False: 0

    def four():
        return (memory.memory_allocated(0), memory.memory_reserved(0), memory.max_memory_allocated(0),
                memory.max_memory_reserved(0))

    def nested():
        stats = memory.memory_stats_as_nested_dict(0)
        allocated, reserved = stats["allocated_bytes"]["all"], stats["reserved_bytes"]["all"]
        return allocated["current"], reserved["current"], allocated["peak"], reserved["peak"]

    rows = {"four_figures_us": _cpu_seconds(four, args.reads) * 1e6, "one_nested_read_us":
            _cpu_seconds(nested, args.reads) * 1e6}
    source = "the CUDA allocator" if real else "a stand-in table (torch's Python flattening only)"
    print(f"CPU time per snapshot of four figures, {args.reads} reads each way, from {source}:")
    print(f"  memory_allocated + memory_reserved + their peaks  {rows['four_figures_us']:8.1f} µs")
    print(f"  one memory_stats_as_nested_dict read              {rows['one_nested_read_us']:8.1f} µs")
    write_json(args.json, {"source": source, "reads": args.reads, **rows,
                           **provenance({"torch": torch.__version__})})
    return 0


if __name__ == "__main__":
    sys.exit(main())
