"""What the streamer's ring layout wastes at the ring's end, and what grouping adjacent units costs in overlap, on the
real unit sizes of SD1.5, SDXL, SD3.5 and FLUX.1 (built on the meta device: no weights, no GPU).

Usage:
    python scripts/ring_waste.py [--archs sd15 sdxl ...] [--ratios 0.5 1 2] [--json out.json]

For each architecture: the planner's plans (no card facts, the native size, 20 steps) for a few budgets that stream
part of the denoiser, and each text encoder streamed whole through its ring of two of its largest unit. For each
ring, in the order the units run (the UNet's down, mid, up blocks):

- ``wrap %``: the bytes the ring's end leaves unused, as a share of all the bytes the ring passes through in one
  forward, when a unit that does not fit before the end starts again at byte 0 (``whole``) and when it is split
  between two of its tensors (``split``, :func:`mlnb.planner.ring.ring_layout` with cuts); ``end %`` adds the space
  after the forward's last unit, which the next forward skips as it starts again at byte 0;
- ``units/groups``: streamed units, and the groups the streamer enters and leaves them in (adjacent units, at most
  :data:`~mlnb.planner.ring.GROUP_SHARE` of the ring);
- ``grouped +%``: for the denoiser, what grouping adds to the step in the planner's schedule replay
  (:func:`mlnb.planner.schedule_step`, split units in both), against a stand-in timeline: every block computing for a
  time proportional to its bytes, the forward's compute ``ratio`` times the streamed bytes' copy time (copy-bound
  below 1), for each ``--ratios``. A stand-in, not a measurement: a card's block timeline gives the real figure;
- ``split +%``: for the denoiser, what splitting the units that pass the ring's end adds to the step in the same
  replay (negative: faster). Filling the ring's end packs the units tighter, so a copy may wait for bytes used more
  recently; the planner chooses split or whole units by this replay against the card's timeline (``split_units``).

Prints a table and writes JSON with the machine, versions, date and command.
"""

from __future__ import annotations

import argparse
import sys

from provenance import provenance, write_json

from mlnb.planner.ring import GROUP_SHARE

BUDGETS = {"sd15": (1.5, 2), "sdxl": (3, 4, 6), "sd35-medium": (3, 4, 6), "sd35-large": (6, 8, 12),
           "flux-dev": (8, 12, 15)}


def _units(modules, names):
    """Per unit: its layout bytes and where its tensors after the first start (the possible cuts)."""
    from mlnb.planner.packed import PackedUnit

    units = [PackedUnit(name, modules[name]) for name in names]
    return [unit.layout.nbytes for unit in units], [unit.layout.offsets[1:] for unit in units]


def _unused(layout) -> tuple[int, int]:
    """Bytes skipped at the ring's end within one forward, and after its last unit."""
    skipped, end = 0, 0
    for position in range(layout.count):
        pieces = layout.pieces(position)
        if position and pieces[0][0] != end:  # started again at byte 0
            skipped += layout.capacity - end
        if len(pieces) == 2:  # split: what its first tensors left before the end
            skipped += layout.capacity - sum(pieces[0])
        end = sum(pieces[-1])
    return skipped, layout.capacity - end


def _ring_row(label: str, sizes, cuts, slots: int, adjacent, shares) -> dict:
    from mlnb.planner.ring import ring_layout

    capacity = min(slots, len(sizes)) * max(sizes)
    row = {"ring": label, "units": len(sizes), "ring_bytes": capacity, "forward_bytes": sum(sizes)}
    for how, given in (("whole", None), ("split", cuts)):
        layout = ring_layout(sizes, capacity, cuts=given, adjacent=adjacent)
        skipped, end = _unused(layout)
        passed = sum(sizes) + skipped
        row[f"wrap_{how}"] = skipped / passed if len(sizes) > slots else 0.0
        row[f"end_{how}"] = (skipped + end) / (passed + end) if len(sizes) > slots else 0.0
    row["groups"] = {str(share): len(ring_layout(sizes, capacity, cuts=cuts, adjacent=adjacent,
                                                 group_share=share).groups) for share in shares}
    return row


def _stand_in(blocks, streamed: set, sizes: dict, ratio: float):
    """A stand-in timeline: every block computing for a time proportional to its bytes, the forward ``ratio`` times
    the streamed bytes' copy time. Returns the forward's seconds, its rows and each streamed block's copy seconds."""
    bandwidth = 25e9  # any: the ratio sets compute against copies
    copy_total = sum(sizes[n] for n in streamed) / bandwidth
    total = sum(nbytes for _, nbytes in blocks)
    rows, at = [], 0.0
    for name, nbytes in blocks:
        seconds = ratio * copy_total * nbytes / total
        rows.append((name, at, seconds))
        at += seconds
    return at, rows, {n: sizes[n] / bandwidth for n in streamed}


def _replay_cost(blocks, streamed: set, sizes: dict, cuts: dict, slots: int, ratio: float, share: float) -> float:
    """Step with groups over step without, minus one, in the schedule replay against a stand-in timeline."""
    from mlnb.planner import schedule_step

    at, rows, copies = _stand_in(blocks, streamed, sizes, ratio)
    grouped = schedule_step(at, rows, 0.0, copies, slots, sizes=sizes, cuts=cuts, group_share=share)
    alone = schedule_step(at, rows, 0.0, copies, slots, sizes=sizes, cuts=cuts, group_share=0.0)
    return grouped / alone - 1


def _split_cost(blocks, streamed: set, sizes: dict, cuts: dict, slots: int, ratio: float) -> float:
    """Step with the units that pass the ring's end split over the step with whole units, minus one, in the schedule
    replay against the stand-in timeline (the streamer's groups in both)."""
    from mlnb.planner import schedule_step

    at, rows, copies = _stand_in(blocks, streamed, sizes, ratio)
    return schedule_step(at, rows, 0.0, copies, slots, sizes=sizes, cuts=cuts) / \
        schedule_step(at, rows, 0.0, copies, slots, sizes=sizes) - 1


def measure(arch: str, ratios, shares) -> list[dict]:
    from mlnb.bench.models import build_arch_pipeline, native_size
    from mlnb.planner import CardFacts, Workload, model_facts, plan_for_budget
    from mlnb.planner.blocks import model_units, text_encoders
    from mlnb.units import GiB

    pipe = build_arch_pipeline(arch, device="meta")
    rows = []
    for name, encoder in text_encoders(pipe).items():
        names = [n for n, _ in model_units(encoder)]
        sizes, cuts = _units(dict(encoder.named_modules()), names)
        rows.append({"arch": arch, **_ring_row(name, sizes, cuts, 2, [True] * (len(names) - 1) + [False], shares)})
    facts = model_facts(pipe)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    modules = dict(denoiser.named_modules())
    rank = {"mid_block": 1, "up_blocks": 2}  # the UNet's registration order puts its up blocks before the mid block
    order = sorted((b.name for b in facts.blocks), key=lambda n: rank.get(n.split(".")[0], 0))
    side = native_size(arch)
    for budget in BUDGETS[arch]:
        plan = plan_for_budget(int(budget * GiB), facts, CardFacts(), Workload(side, side, 1, 20))
        if not plan.streamed:
            continue
        streamed = [n for n in order if n in set(plan.streamed)]
        sizes, cuts = _units(modules, streamed)
        is_streamed = [n in set(plan.streamed) for n in order] + [False]
        adjacent = [is_streamed[i + 1] for i, n in enumerate(order) if is_streamed[i]]
        row = _ring_row(f"denoiser at {budget:g} GiB", sizes, cuts, plan.slots, adjacent, shares)
        blocks = [(n, b.nbytes) for n in order for b in facts.blocks if b.name == n]
        by_name = dict(zip(streamed, sizes))
        cut_of = dict(zip(streamed, cuts))
        row["grouped_cost"] = {str(share): {str(r): _replay_cost(blocks, set(streamed), by_name, cut_of, plan.slots,
                                                                 r, share) for r in ratios} for share in shares}
        row["split_cost"] = {str(r): _split_cost(blocks, set(streamed), by_name, cut_of, plan.slots, r) for r in ratios}
        rows.append({"arch": arch, **row})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(BUDGETS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    parser.add_argument("--shares", nargs="+", type=float, default=[0.125, GROUP_SHARE, 0.5],
                        help="group limits to compare, as shares of the ring")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    import diffusers
    import torch

    import mlnb

    rows = [row for arch in args.archs for row in measure(arch, args.ratios, args.shares)]
    print(f"{'arch':<12} {'ring':<22} {'MiB':>5} {'units':>5} {'wrap whole':>10} {'split':>6} "
          f"{'+end whole':>10} {'split':>6}")
    for row in rows:
        print(f"{row['arch']:<12} {row['ring']:<22} {row['ring_bytes'] / 2**20:>5.0f} {row['units']:>5} "
              f"{100 * row['wrap_whole']:>9.1f}% {100 * row['wrap_split']:>5.1f}% "
              f"{100 * row['end_whole']:>9.1f}% {100 * row['end_split']:>5.1f}%")
    ratios = " ".join(f"{'+% r=' + format(r, 'g'):>9}" for r in args.ratios)
    print(f"\n{'arch':<12} {'ring':<22} {'share':>6} {'units':>5} {'groups':>6} {ratios}")
    for row in rows:
        for share in args.shares:
            cost = " ".join(f"{100 * row['grouped_cost'][str(share)][str(r)]:>9.2f}" for r in args.ratios) \
                if "grouped_cost" in row else ""
            print(f"{row['arch']:<12} {row['ring']:<22} {share:>6.3g} {row['units']:>5} "
                  f"{row['groups'][str(share)]:>6} {cost}")
    print(f"\n{'arch':<12} {'ring':<22} {'units':>5} {ratios}   (split units against whole ones)")
    for row in rows:
        if "split_cost" in row:
            cost = " ".join(f"{100 * row['split_cost'][str(r)]:>9.2f}" for r in args.ratios)
            print(f"{row['arch']:<12} {row['ring']:<22} {row['units']:>5} {cost}")
    result = {
        "rows": rows,
        **provenance({"mlnb": mlnb.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__}),
    }
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
