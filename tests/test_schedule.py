"""The planner's replay of a streamed step against a measured resident forward (pure: no torch, no device)."""

from __future__ import annotations

import dataclasses

import pytest

from mlnb.planner import (
    Block, BudgetError, CardFacts, ModelFacts, Workload, cost, plan_for_budget, predict, schedule_step, search,
    streamed_step,
)
from mlnb.units import MiB


def _rows(*blocks):
    """``(name, seconds)`` pairs back to back from 0: a timeline's rows."""
    rows, at = [], 0.0
    for name, seconds in blocks:
        rows.append((name, at, seconds))
        at += seconds
    return rows


def test_nothing_streamed_is_the_forward_and_the_scheduler_s_step():
    rows = _rows(("a", 0.04), ("b", 0.05))
    assert schedule_step(0.1, rows, 0.01, {}) == pytest.approx(0.11)  # 0.01 of the forward is outside the blocks


def test_copies_behind_enough_compute_cost_nothing():
    rows = _rows(("r0", 0.05), ("s0", 0.01), ("r1", 0.05), ("s1", 0.01))
    assert schedule_step(0.12, rows, 0.0, {"s0": 0.001, "s1": 0.001}) == pytest.approx(0.12)


def test_a_chain_with_no_compute_to_hide_behind_runs_at_the_copy_engine_s_pace():
    rows = _rows(*[(f"s{i}", 0.001) for i in range(4)])
    step = schedule_step(0.004, rows, 0.0, {f"s{i}": 0.01 for i in range(4)})
    assert step == pytest.approx(0.04)  # the engine never idles: the floor is the copies


def test_a_third_slot_lets_a_step_s_first_resident_compute_hide_all_its_copies():
    """A heavy resident block, then three light streamed ones copying 10 ms each. With two slots the third unit's
    copy can start only when the first has computed (then the engine is busy with it and the next step's second
    unit): 9 ms of stall a step, worked out by hand. With three, every copy arrives during the next heavy block."""
    rows = _rows(("r", 0.030), ("s0", 0.001), ("s1", 0.001), ("s2", 0.001))
    copies = {"s0": 0.010, "s1": 0.010, "s2": 0.010}
    assert schedule_step(0.033, rows, 0.0, copies, slots=2) == pytest.approx(0.042)
    assert schedule_step(0.033, rows, 0.0, copies, slots=3) == pytest.approx(0.033)
    assert schedule_step(0.033, rows, 0.0, copies, slots=5) == pytest.approx(0.033)  # no more slots than units


def _card_with_timeline(heavy: float = 0.02, light: float = 0.001, between: float = 0.004):
    """Twelve blocks of 100 MiB: six that compute a lot (b0..b5), then six that compute little (b6..b11)."""
    rows = _rows(*[(f"b{i}", heavy if i < 6 else light) for i in range(12)])
    forward = 6 * heavy + 6 * light
    facts = ModelFacts(encoders={"te": 10 * MiB}, vae=10 * MiB,
                       blocks=tuple(Block(f"b{i}", 100 * MiB) for i in range(12)), denoiser_other=10 * MiB)
    card = CardFacts(bandwidth=10e9, step_seconds=forward + between, decode_seconds=0.01, denoise_reserve=50 * MiB,
                     decode_reserve=50 * MiB, block_timeline=(forward, tuple(rows)))
    return facts, card


def test_with_a_block_timeline_the_plan_streams_the_blocks_with_compute_to_hide_copies_behind():
    """Six of twelve equal blocks fit. By size alone the streamed ones are spread (every other block), and three of
    them sit among blocks that compute little, so their copies stall the step. With the timeline the planner keeps
    the light blocks resident and streams the heavy ones, whose compute hides every copy (10.5 ms each)."""
    facts, card = _card_with_timeline()
    work = Workload(512, 512, 1, 20)
    budget = int(940 * MiB)
    plan = plan_for_budget(budget, facts, card, work)
    assert plan.strategy == "stream" and plan.slots == 2
    assert plan.streamed == tuple(f"b{i}" for i in range(6))
    assert streamed_step(plan, facts, card) == pytest.approx(card.step_seconds)  # at the floor: compute
    by_size = plan_for_budget(budget, facts, dataclasses.replace(card, block_timeline=None), work)
    assert by_size.streamed == ("b1", "b3", "b5", "b7", "b9", "b11")
    assert streamed_step(by_size, facts, card) > 1.05 * card.step_seconds
    assert plan.predicted_seconds < predict(by_size, facts, card, work)[1]
    assert predict(plan, facts, card, work) == (plan.predicted_peak, pytest.approx(plan.predicted_seconds))


def test_three_slots_cost_a_third_slot_of_memory_and_are_offered_only_with_a_timeline():
    facts, card = _card_with_timeline()
    work = Workload(512, 512, 1, 20)
    plan = plan_for_budget(int(940 * MiB), facts, card, work)
    three = dataclasses.replace(plan, slots=3)
    assert predict(three, facts, card, work)[0] == plan.predicted_peak + 100 * MiB
    offered = {p.slots for p in search._candidates(int(940 * MiB), facts, card, work) if p.strategy == "stream"}
    assert offered == {2, 3}
    blind = dataclasses.replace(card, block_timeline=None)
    assert {p.slots for p in search._candidates(int(940 * MiB), facts, blind, work) if p.strategy == "stream"} == {2}
    assert "through 3 slots" in three.summary() and "slots" not in plan.summary()


def test_the_measured_overhead_per_unit_adds_to_the_replay_and_a_timeline_without_a_block_is_not_used():
    facts, card = _card_with_timeline()
    work = Workload(512, 512, 1, 20)
    plan = plan_for_budget(int(940 * MiB), facts, card, work)
    replayed = streamed_step(plan, facts, card)
    units = len(plan.streamed)
    slower = dataclasses.replace(card, unit_overhead=0.001)
    assert streamed_step(plan, facts, slower) == pytest.approx(replayed + units * 0.001)
    assert streamed_step(plan, facts, slower, calibrated=False) == pytest.approx(replayed)
    assert predict(plan, facts, slower, work)[1] == pytest.approx(plan.predicted_seconds + 20 * units * 0.001)
    forward, rows = card.block_timeline
    partial = dataclasses.replace(card, block_timeline=(forward, rows[1:]))  # b0 was not timed
    assert streamed_step(plan, facts, partial) is None  # no replay: the step is compute plus every copy
    fp8 = dataclasses.replace(plan, fp8=True)
    assert streamed_step(fp8, facts, card) > replayed  # fp8 storage upcasts every layer: slower compute


def test_the_planner_s_replay_splits_blocks_at_the_ring_s_end_where_the_streamer_does():
    """Blocks of 60 and 100 MiB through a ring of two or three 100 MiB slots: a 60 MiB block reaches past the ring's
    end. With the blocks' tensor offsets in the facts, the planner's replay splits it there as the streamer does
    (the same step as the replay given those cuts); without them it replays whole units, a different schedule. Which
    is faster depends on the plan: the planner chooses by the replay (two slots here: whole; three: split)."""
    sizes = [60, 100, 60, 100, 60, 100]
    rows = [(f"b{i}", 0.004 * i, 0.004) for i in range(len(sizes))]
    offsets = {60: (20, 40), 100: (25, 50, 75)}
    split = ModelFacts(encoders={"te": 10 * MiB}, vae=10 * MiB, denoiser_other=10 * MiB, blocks=tuple(
        Block(f"b{i}", size * MiB, tuple(c * MiB for c in offsets[size])) for i, size in enumerate(sizes)))
    whole = dataclasses.replace(split, blocks=tuple(Block(b.name, b.nbytes) for b in split.blocks))
    card = CardFacts(bandwidth=20e9, step_seconds=0.026, decode_seconds=0.01, denoise_reserve=50 * MiB,
                     decode_reserve=50 * MiB, block_timeline=(0.024, tuple(rows)))
    names = tuple(name for name, _, _ in rows)
    between = card.step_seconds - 0.024
    for slots in (2, 3):
        plan = dataclasses.replace(plan_for_budget(int(2000 * MiB), split, card, Workload(512, 512, 1, 20)),
                                   strategy="stream", resident=(), streamed=names, slots=slots, split_units=True)
        copies = {b.name: b.nbytes / card.bandwidth for b in split.blocks}
        by_cuts = schedule_step(0.024, rows, between, copies, slots, sizes={b.name: b.nbytes for b in split.blocks},
                                cuts={b.name: b.cuts for b in split.blocks})
        assert streamed_step(plan, split, card) == pytest.approx(by_cuts)
        unsplit = streamed_step(dataclasses.replace(plan, split_units=False), split, card)
        assert unsplit == pytest.approx(streamed_step(plan, whole, card)) != pytest.approx(by_cuts)
        assert (by_cuts < unsplit) == (slots == 3)
    chosen = set()
    for budget in (300, 350, 400, 450, 500):  # each streamed candidate: split where the replay finds that faster
        for plan in search._candidates(int(budget * MiB), split, card, Workload(512, 512, 1, 20)):
            if plan.strategy == "stream":
                steps = [streamed_step(dataclasses.replace(plan, split_units=s), split, card) for s in (False, True)]
                assert plan.split_units == (steps[1] < steps[0])
                chosen.add(plan.split_units)
    assert chosen == {False, True}
    assert cost.stored_cuts(split, True)["b0"] == (10 * MiB, 20 * MiB)  # fp8 halves the blocks and their offsets
    assert cost.stored_cuts(whole, False) == {}


def test_a_measured_fragmentation_above_8_percent_of_the_budget_is_left_unallocated():
    """The allocator reserves above what it allocates; under a cap, a plan that leaves it too little makes it free
    its cache and retry (a device synchronize) as it runs. The planner leaves 8% of the budget, or what the card
    measured over a resident denoising loop when that is more."""
    facts, card = _card_with_timeline()
    work = Workload(512, 512, 1, 20)
    budget = int(940 * MiB)
    loose = plan_for_budget(budget, facts, card, work)
    assert loose.predicted_peak <= budget * 0.92
    fragmented = dataclasses.replace(card, fragmentation_reserve=200 * MiB)
    tight = plan_for_budget(budget, facts, fragmented, work)
    assert tight.predicted_peak <= budget - 200 * MiB < loose.predicted_peak
    assert len(tight.resident) < len(loose.resident)
    small = dataclasses.replace(card, fragmentation_reserve=10 * MiB)  # less than 8%: the 8% stands
    assert plan_for_budget(budget, facts, small, work) == loose
    with pytest.raises(BudgetError) as error:
        plan_for_budget(int(300 * MiB), facts, fragmented, work)
    assert "give at least" in str(error.value)


def test_a_step_is_the_larger_of_the_gpu_chain_and_the_host_s_issue_time():
    """The GPU chain is the replay (compute and copies); the host chain the resident forward's issue time, the
    streamer's host time per unit for each streamed unit, and the scheduler's step between forwards. Whichever is
    longer sets the step; what streamed steps took beyond both adds per unit."""
    facts, card = _card_with_timeline()
    work = Workload(512, 512, 1, 20)
    plan = plan_for_budget(int(940 * MiB), facts, card, work)
    replay = streamed_step(plan, facts, card, calibrated=False)
    units = len(plan.streamed)
    between = card.step_seconds - card.block_timeline[0]
    assert streamed_step(plan, facts, card) == pytest.approx(replay)  # no host time measured: the GPU chain
    quick = dataclasses.replace(card, host_forward_seconds=0.01, host_unit_seconds=0.0001)
    gpu, host = cost.step_chains(quick, dict((b.name, b.nbytes) for b in facts.blocks), plan.streamed, 2, False)
    assert (gpu, host) == (pytest.approx(replay), pytest.approx(0.01 + units * 0.0001 + between))
    assert streamed_step(plan, facts, quick) == pytest.approx(replay)  # the GPU is the longer: the host hides
    launch_bound = dataclasses.replace(card, host_forward_seconds=0.12, host_unit_seconds=0.003)
    host = 0.12 + units * 0.003 + between
    assert host > replay
    assert streamed_step(plan, facts, launch_bound) == pytest.approx(host)  # the host is the longer: it is the step
    assert predict(plan, facts, launch_bound, work)[1] == pytest.approx(
        predict(plan, facts, card, work)[1] + 20 * (host - replay))
    residual = dataclasses.replace(launch_bound, unit_overhead=0.0005)
    assert streamed_step(plan, facts, residual) == pytest.approx(host + units * 0.0005)
    assert streamed_step(plan, facts, residual, calibrated=False) == pytest.approx(replay)
    # A resident plan's step: the measured step, or the host's if that is longer (a forward issued slower than run).
    sizes = {b.name: b.nbytes for b in facts.blocks}
    assert cost.step_time(card, sizes, (), 2, False) == card.step_seconds
    assert cost.step_time(launch_bound, sizes, (), 2, False) == card.step_seconds  # 0.13 s against 0.124
    slower_host = dataclasses.replace(card, host_forward_seconds=0.2)
    assert cost.step_time(slower_host, sizes, (), 2, False) == pytest.approx(0.2 + between)


def test_without_a_timeline_the_gpu_chain_is_compute_plus_every_copy():
    """No fitted share of the copies hidden: without a replay, the copies add up (an upper bound), and the host
    chain still bounds the step from below."""
    facts, card = _card_with_timeline()
    blind = dataclasses.replace(card, block_timeline=None)
    sizes = {b.name: b.nbytes for b in facts.blocks}
    streamed = ("b0", "b1")
    copies = 200 * MiB / blind.bandwidth
    assert cost.step_time(blind, sizes, streamed, 2, False) == pytest.approx(blind.step_seconds + copies)
    assert cost.step_time(blind, sizes, streamed, 2, True) == pytest.approx(
        blind.step_seconds * cost.FP8_STEP_FACTOR + copies)
    slow_host = dataclasses.replace(blind, host_forward_seconds=1.0, host_unit_seconds=0.1)
    assert cost.step_time(slow_host, sizes, streamed, 2, False) == pytest.approx(1.2)  # no timeline: no between
    assert cost.step_time(dataclasses.replace(blind, bandwidth=None), sizes, streamed, 2, False) is None
    assert cost.step_time(CardFacts(), sizes, streamed, 2, False) is None
