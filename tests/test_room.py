"""Room on the GPU: other cached pipelines' GPU weights are unloaded, least recently used first, when a load, a planned
generation or the OOM rescue needs the memory (pure rule, then tiny pipelines on a fake device)."""

from __future__ import annotations

import gc
import logging
import threading

import pytest

import mlnb
from mlnb.device import FakeDevice, FakeOutOfMemoryError
from mlnb.levels import OptimizationLevel
from mlnb.pipeline import ManagedPipeline, cached_pipelines, generate_with_rescue
from mlnb.pipeline.room import gpu_bytes, holders, make_room, to_unload
from mlnb.plan import room_needed
from mlnb.units import GiB, MiB

FAST = dict(steps=2, width=64, height=64)


@pytest.fixture(autouse=True)
def _empty_cache():
    mlnb.pipeline.unload_all()
    yield
    mlnb.pipeline.unload_all()


# ---------------------------------------------------------------------------------------------------------------
# The rule (pure)


@pytest.mark.parametrize("needed, free, held, count", [
    (1 * GiB, 2 * GiB, [3 * GiB], 0),  # fits already
    (4 * GiB, 1 * GiB, [2 * GiB, 2 * GiB, 2 * GiB], 2),  # the fewest, oldest first
    (4 * GiB, 1 * GiB, [1 * GiB, 5 * GiB], 2),  # in order, not the largest
    (9 * GiB, 1 * GiB, [1 * GiB, 1 * GiB], 2),  # never enough: all of them
    (1 * GiB, 0, [], 0),  # nothing to unload
])
def test_to_unload_takes_the_fewest_holders_in_order_that_reach_the_need(needed, free, held, count):
    assert to_unload(needed, free, held) == count


def test_room_needed_adds_the_plans_margin():
    assert room_needed(int(0.92 * GiB)) == GiB
    assert room_needed(GiB, mlnb.plan.CardFacts(fragmentation_reserve=512 * MiB)) == GiB + 512 * MiB


# ---------------------------------------------------------------------------------------------------------------
# Tiny pipelines on a fake device


def _on_gpu(fake: FakeDevice, managed: ManagedPipeline) -> int:
    """Put ``managed``'s denoiser on the fake GPU (its bytes allocated until its tensors die); returns the bytes."""
    for tensor in managed.pipe.unet.parameters():
        fake.track(tensor, allocate=True)
    return gpu_bytes(managed)


def _leave_free(fake: FakeDevice, free: int) -> None:
    fake.other_processes = fake.total - fake.reserved - free


def test_gpu_bytes_counts_the_weights_the_device_holds(tiny_sd):
    fake = FakeDevice()
    managed = mlnb.load_pipeline(tiny_sd, level="none", device=fake)
    assert gpu_bytes(managed) == 0
    held = _on_gpu(fake, managed)
    assert held == sum(p.numel() * p.element_size() for p in managed.pipe.unet.parameters()) > 0
    assert fake.allocated == held


def _copy(tiny_sd, tiny_root, name: str):
    import shutil

    folder = tiny_root / name
    if not folder.exists():
        shutil.copytree(tiny_sd, folder)
    return folder


def test_a_budget_load_unloads_the_least_recently_used_model_holding_the_gpu(tiny_sd, tiny_sdxl, tiny_root,
                                                                               caplog):
    """Two models hold GPU memory; the budget plan for a third needs part of it: the one used longest ago goes, the
    other stays, a model holding nothing on the GPU stays, and the warning names what went and why."""
    planned_folder, offloaded_folder = _copy(tiny_sd, tiny_root, "sd-a"), _copy(tiny_sd, tiny_root, "sd-b")
    probe = mlnb.load_pipeline(planned_folder, budget="2GiB", device=FakeDevice(total=16 * GiB))
    needed = room_needed(probe.plan.predicted_peak)
    probe.unload()
    fake = FakeDevice(total=16 * GiB)
    recent = mlnb.load_pipeline(tiny_sdxl, level="none", device=fake)
    old = mlnb.load_pipeline(tiny_sd, level="none", device=fake)
    offloaded = mlnb.load_pipeline(offloaded_folder, level="none", device=fake)  # holds nothing on the GPU
    recent_bytes, old_bytes = _on_gpu(fake, recent), _on_gpu(fake, old)
    recent.generate("a fox", seed=1, **FAST)  # `old` is now the least recently used
    _leave_free(fake, needed - min(old_bytes, recent_bytes) // 2)

    with caplog.at_level(logging.WARNING, logger="mlnb"):
        planned = mlnb.load_pipeline(planned_folder, budget="2GiB", device=fake)
    gc.collect()
    assert not old.loaded and recent.loaded and offloaded.loaded
    assert planned.loaded and planned in cached_pipelines()
    assert f"unloading {old.model} (none, " in caplog.text and f"to make room for {planned.model}" in caplog.text
    assert fake.free_bytes() >= needed  # its memory came back


def test_a_load_that_fits_unloads_nothing(tiny_sd, tiny_sdxl, caplog):
    fake = FakeDevice(total=16 * GiB)
    other = mlnb.load_pipeline(tiny_sdxl, level="none", device=fake)
    _on_gpu(fake, other)
    with caplog.at_level(logging.WARNING, logger="mlnb"):
        mlnb.load_pipeline(tiny_sd, budget="2GiB", device=fake)
    assert other.loaded and "to make room" not in caplog.text


def test_a_planned_generation_unloads_a_model_loaded_into_its_room_since(tiny_sd, tiny_sdxl, caplog):
    """The plan was made with the card to itself; a model loaded beside it since holds part of its peak: generating
    unloads that model first instead of running out of memory."""
    fake = FakeDevice(total=16 * GiB)
    planned = mlnb.load_pipeline(tiny_sd, budget="2GiB", device=fake)
    other = mlnb.load_pipeline(tiny_sdxl, level="none", device=fake)
    held = _on_gpu(fake, other)
    peak, _ = planned.predict(mlnb.plan.Workload(64, 64, 1, 2))
    _leave_free(fake, room_needed(peak) - held // 2)
    with caplog.at_level(logging.WARNING, logger="mlnb"):
        planned.generate("a fox", seed=1, **FAST)
    assert not other.loaded and planned.loaded
    assert f"unloading {other.model}" in caplog.text


def test_a_model_generating_in_another_thread_is_never_unloaded(tiny_sd, tiny_sdxl):
    fake = FakeDevice(total=16 * GiB)
    busy = mlnb.load_pipeline(tiny_sdxl, level="none", device=fake)
    _on_gpu(fake, busy)
    holding, release = threading.Event(), threading.Event()

    def generate_slowly():
        with busy._generating:  # what a generation holds while it runs
            holding.set()
            release.wait(10)

    worker = threading.Thread(target=generate_slowly)
    worker.start()
    try:
        holding.wait(10)
        assert holders(fake, besides="") == []
        assert make_room(fake.total, fake, "another") == []
        assert busy.loaded
    finally:
        release.set()
        worker.join()
    assert [m for m, _ in holders(fake, besides="")] == [busy]


def test_oom_with_another_model_on_the_gpu_unloads_it_and_retries_at_the_same_level(tiny_sd, tiny_sdxl,
                                                                                     monkeypatch, caplog):
    """The first out-of-memory error unloads the other model holding GPU memory and runs the same pipeline again,
    not a slower level; no model beside it: the level goes up as before."""
    fake = FakeDevice(total=16 * GiB)
    managed = mlnb.load_pipeline(tiny_sd, level="none", device=fake)
    other = mlnb.load_pipeline(tiny_sdxl, level="none", device=fake)
    _on_gpu(fake, other)
    original = ManagedPipeline.generate
    tried = []

    def generate(self, *args, **kwargs):
        tried.append((self.model, self.level))
        if other.loaded:
            raise FakeOutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ManagedPipeline, "generate", generate)
    with caplog.at_level(logging.WARNING, logger="mlnb"):
        result = generate_with_rescue(managed, prompt="a fox", seed=1, **FAST)
    assert tried == [(managed.model, OptimizationLevel.NONE)] * 2
    assert result.level is OptimizationLevel.NONE and result.rescued_from is None
    assert not other.loaded and managed.loaded
    assert "unloading it and retrying" in caplog.text and result.notes


def test_auto_on_a_cuda_card_plans_for_the_free_memory_and_what_cached_pipelines_hold(tiny_sd, tiny_sdxl):
    """auto's budget is the memory free now plus what other cached pipelines hold on the GPU (unloaded as far as
    the plan needs), and its reason says how much of each."""
    from mlnb.pipeline.loading import load_diffusers_pipeline
    from mlnb.pipeline.managed import _choose

    class CudaLike(FakeDevice):
        is_cuda = True

    fake = CudaLike(total=16 * GiB)
    other = mlnb.load_pipeline(tiny_sdxl, level="none", device=fake)
    held = _on_gpu(fake, other)
    _leave_free(fake, 1 * GiB)
    choice, plan, _ = _choose(load_diffusers_pipeline(tiny_sd), None, None, fake, None)
    assert plan is not None and plan.budget == 1 * GiB + held
    assert choice.reason.startswith(f"plan for the 1.0 GiB free and {mlnb.units.format_bytes(held)} held by cached")
