"""The planner's host RAM: a plan counts the page-locked bytes of its host copies as they are packed, and where they
exceed the host RAM it may pin, leaves the offloaded components and then streamed units in the weight files'
mapping (pure planner tests on the real FLUX.1-dev and SD3.5 unit sizes, from ``tests/data/arch_facts.json``).

``arch_facts.json`` holds :func:`mlnb.planner.model_facts` of the public configs built on the meta device
(``mlnb.bench.models.build_arch_pipeline``, fp16 weights: the bytes of bf16); tests/test_dit_plan.py checks it against
a fresh build of FLUX.1-dev. Written by::

    PYTHONPATH=$PWD python -c "import tests.test_host_plan as t; t.write_arch_facts()"
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mlnb.planner import CardFacts, Workload, plan_for_budget
from mlnb.planner.cost import Block, ModelFacts, predict, stored_bytes
from mlnb.planner.host_ram import PAGEABLE_FRACTION, pinned_bytes
from mlnb.planner.pinning import BIN_BYTES, packed_bytes
from mlnb.planner.search import HOST_MARGIN, BudgetError, host_budget, usable_bytes
from mlnb.units import GiB, MiB

FACTS = Path(__file__).parent / "data" / "arch_facts.json"
ARCHS = ("flux-dev", "sd35-large", "sd35-medium")
T4 = 15 * GiB
HOST = 12 * GiB
WORK = Workload(1024, 1024, 1, 20)


def facts_to_json(facts: ModelFacts) -> dict:
    return {
        "encoders": facts.encoders, "vae": facts.vae, "blocks": [[b.name, b.nbytes] for b in facts.blocks],
        "denoiser_other": facts.denoiser_other, "bytes_per_param": facts.bytes_per_param,
        "encoder_slots": facts.encoder_slots, "encoder_units": {k: list(v) for k, v in facts.encoder_units.items()},
    }


def facts_from_json(data: dict) -> ModelFacts:
    return ModelFacts(
        encoders=data["encoders"], vae=data["vae"], blocks=tuple(Block(n, b) for n, b in data["blocks"]),
        denoiser_other=data["denoiser_other"], bytes_per_param=data["bytes_per_param"],
        encoder_slots=data["encoder_slots"], encoder_units={k: tuple(v) for k, v in data["encoder_units"].items()},
    )


def write_arch_facts() -> None:
    from mlnb.bench.models import build_arch_pipeline
    from mlnb.planner import model_facts

    data = {name: facts_to_json(model_facts(build_arch_pipeline(name, device="meta"))) for name in ARCHS}
    FACTS.parent.mkdir(exist_ok=True)
    FACTS.write_text(json.dumps(data, indent=1) + "\n")


@pytest.fixture(scope="module")
def archs() -> dict[str, ModelFacts]:
    return {name: facts_from_json(data) for name, data in json.loads(FACTS.read_text()).items()}


def test_packed_bytes_are_what_packing_allocates():
    """The planner's count of a packing is the packer's own, for units above and below a buffer's size."""
    import torch

    from mlnb.planner.pinning import pack

    allocated = []

    def allocate(nbytes):
        allocated.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    sizes = [3 * MiB, 40 * MiB, 40 * MiB, 70 * MiB, 1000, 130 * MiB, 9 * MiB]
    groups = [[torch.empty(n // 4, dtype=torch.float32)] for n in sizes]
    _, total = pack(groups, allocate)
    assert total == sum(allocated) == packed_bytes(sizes)
    assert packed_bytes([130 * MiB]) == 256 * MiB  # a power of two
    assert packed_bytes([BIN_BYTES // 2] * 4) == 2 * BIN_BYTES and packed_bytes([]) == 0


def test_the_default_host_budget_is_the_available_ram_less_a_margin():
    assert host_budget(total=12_700_000_000, available=11 * GiB) == 11 * GiB - 1_270_000_000
    assert host_budget(total=4 * GiB, available=3 * GiB) == 3 * GiB - HOST_MARGIN


@pytest.mark.parametrize("name", ARCHS)
def test_a_plan_counts_its_pinned_copies(archs, name):
    """Without a host limit a 15 GiB plan pins its streamed units, text encoders and VAE, counted as packed."""
    facts = archs[name]
    plan = plan_for_budget(T4, facts, CardFacts(), WORK, host=float("inf"))
    assert plan.offload_encoders_vae and plan.host_budget is None and not plan.mapped_bytes
    expected = (packed_bytes([dict((b.name, b.nbytes) for b in facts.blocks)[n] for n in plan.streamed])
                + sum(packed_bytes(units) for units in facts.encoder_units.values()) + packed_bytes([facts.vae]))
    assert plan.pinned_bytes == expected == pinned_bytes(facts, stored_bytes(facts, False)[0], plan.streamed, True)
    assert plan.pinned_bytes >= plan.streamed_bytes + sum(facts.encoders.values()) + facts.vae
    assert f"pinned {plan.pinned_bytes / GiB:.1f} GiB" in plan.summary()


@pytest.mark.parametrize("name", ARCHS)
def test_under_a_t4_and_12_gib_of_host_ram_the_plan_fits_both(archs, name):
    facts = archs[name]
    plan = plan_for_budget(T4, facts, CardFacts(), WORK, host=HOST)
    assert plan.predicted_peak <= usable_bytes(T4, CardFacts())
    assert plan.pinned_bytes <= HOST and plan.host_budget == HOST
    assert plan.pinned_bytes == pinned_bytes(facts, stored_bytes(facts, plan.fp8)[0], plan.streamed,
                                             plan.offload_encoders_vae, plan.decode_offload, plan.mapped_units,
                                             plan.mapped_models)
    assert set(plan.mapped_units) <= set(plan.streamed)


def test_flux_dev_would_pin_more_than_12_gib_and_leaves_t5_in_the_mapping_first(archs):
    """FLUX.1-dev in 16 bits under 15 GiB pins about 26 GiB (streamed transformer blocks, T5-XXL, CLIP, VAE, each
    packing rounded to powers of two). With 12 GiB of host RAM, T5 (copied once per image) stays in the files'
    mapping, no streamed block does, and 16-bit weights are kept."""
    facts = archs["flux-dev"]
    free = plan_for_budget(T4, facts, CardFacts(), WORK, host=float("inf"))
    assert free.pinned_bytes > 20 * GiB and not free.fp8
    plan = plan_for_budget(T4, facts, CardFacts(), WORK, host=HOST)
    assert "text_encoder_2" in plan.mapped_models and not plan.mapped_units and not plan.fp8
    assert plan.strategy == "stream" and plan.streamed_bytes > 8 * GiB
    assert plan.mapped_bytes == facts.encoders["text_encoder_2"]
    assert "left mapped from the files (text_encoder_2)" in plan.summary()


def test_less_host_ram_leaves_streamed_units_mapped_after_fp8_without_card_facts(archs):
    """At 4 GiB even fp8 with every component mapped pins too much: streamed units stay mapped too (largest first),
    and the pinned rest fits."""
    facts = archs["flux-dev"]
    plan = plan_for_budget(T4, facts, CardFacts(), WORK, host=4 * GiB)
    assert plan.pinned_bytes <= 4 * GiB
    assert set(plan.mapped_models) == {"text_encoder", "text_encoder_2", "vae"} or plan.fp8
    sizes = {b.name: b.nbytes for b in facts.blocks}
    if plan.mapped_units:
        pinned = [sizes[n] for n in plan.streamed if n not in plan.mapped_units]
        assert min(sizes[n] for n in plan.mapped_units) >= max(pinned, default=0)


def test_with_card_facts_the_time_model_charges_mapped_copies_at_the_pageable_bandwidth(archs):
    facts = archs["flux-dev"]
    card = CardFacts(bandwidth=20e9, step_seconds=0.5, decode_seconds=0.3, other_seconds=1.0)
    free = plan_for_budget(T4, facts, card, WORK, host=float("inf"))
    tight = plan_for_budget(T4, facts, card, WORK, host=2 * GiB)
    assert tight.pinned_bytes <= 2 * GiB and tight.mapped_bytes
    assert tight.predicted_seconds > free.predicted_seconds
    # the plan's prediction is the time model's, and a measured pageable bandwidth replaces the assumed fraction
    assert predict(tight, facts, card, WORK)[1] == pytest.approx(tight.predicted_seconds)
    faster = dataclasses.replace(card, pageable_bandwidth=card.bandwidth * PAGEABLE_FRACTION * 2)
    assert predict(tight, facts, faster, WORK)[1] < tight.predicted_seconds


def test_a_host_with_no_ram_to_spare_is_refused_in_one_line(archs):
    with pytest.raises(BudgetError) as refused:
        plan_for_budget(T4, archs["flux-dev"], CardFacts(), WORK, host=-1)
    message = str(refused.value)
    assert "\n" not in message and "host RAM" in message and "15.0 GiB of GPU memory" in message
