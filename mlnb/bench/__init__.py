"""``mlnb bench``: measure mlnb's levels against plain diffusers, each recipe in a fresh process.

Models are the real SD1.5 and SDXL-base architectures with random weights (memory and time depend on shapes, not
values), or a real model with ``--model``. A memory cap (``--cap-gib N`` or ``--caps``) simulates a smaller card
with :meth:`mlnb.device.Device.set_memory_cap`; a run that does not fit is reported as OOM. On a machine without CUDA the
tiny test models run on the CPU, which checks the harness and nothing else.

Usage::

    mlnb bench --quick                      # a few minutes on one GPU: the targets
    mlnb bench --models sdxl --recipes diffusers,mlnb-ultra --caps 4,none --steps 20 --json sdxl.json
    python -m mlnb.bench --device cpu       # the harness check on the tiny models
    mlnb bench --models sdxl --loras 5 --lora-rank 32 --caps sdxl:4   # also with 5 random rank-32 LoRAs

The modules: :mod:`.models` (architectures, building), :mod:`.loras` (random LoRAs of the real shapes),
:mod:`.recipes` (what each recipe sets up), :mod:`.worker` (one job in a fresh process), :mod:`.runner` (planning
and launching), :mod:`.report` (ratios, streaming floor, table), :mod:`.targets` (the verdicts) and
:mod:`.command` (the command line). See ``docs/benchmarks.md``.
"""

from __future__ import annotations

from .command import main

__all__ = ["main"]
