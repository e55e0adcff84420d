"""Room on the GPU: other cached pipelines' GPU weights are unloaded, least recently used first, when a load, a planned
generation or the OOM rescue needs the memory (pure rule, then tiny pipelines on a fake device)."""

from __future__ import annotations

import gc
import logging
import threading

import pytest

import mlnb
from mlnb.levels import OptimizationLevel
from mlnb.pipeline import ManagedPipeline, cached_pipelines, generate_with_rescue
from mlnb.pipeline.cache import gpu_bytes, holders, make_room
from mlnb.planner import CardFacts, Workload, room_needed
from mlnb.testing import FakeDevice, FakeOutOfMemoryError
from mlnb.units import GiB, MiB

FAST = dict(steps=2, width=64, height=64)


@pytest.fixture(autouse=True)
def _empty_cache():
    mlnb.pipeline.unload_all()
    yield
    mlnb.pipeline.unload_all()


# ---------------------------------------------------------------------------------------------------------------
# The margin (pure)


def test_room_needed_adds_the_plans_margin():
    assert room_needed(int(0.92 * GiB)) == GiB
    assert room_needed(GiB, CardFacts(fragmentation_reserve=512 * MiB)) == GiB + 512 * MiB


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
    peak, _ = planned.predict(Workload(64, 64, 1, 2))
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
        with busy.hold():  # what a generation holds while it runs
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
    original = ManagedPipeline.run
    tried = []

    def run(self, *args, **kwargs):
        tried.append((self.model, self.level))
        if other.loaded:
            raise FakeOutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ManagedPipeline, "run", run)
    with caplog.at_level(logging.WARNING, logger="mlnb"):
        result = generate_with_rescue(managed, prompt="a fox", seed=1, **FAST)
    assert tried == [(managed.model, OptimizationLevel.NONE)] * 2
    assert result.level is OptimizationLevel.NONE and result.rescued_from is None
    assert not other.loaded and managed.loaded
    assert "unloading it and retrying" in caplog.text and result.notes


def _two_holders(tiny_sd, tiny_sdxl, fake):
    """``old`` (used first) and ``recent``, both with their denoisers on the fake GPU."""
    old = mlnb.load_pipeline(tiny_sd, level="none", device=fake)
    recent = mlnb.load_pipeline(tiny_sdxl, level="none", device=fake)
    return old, _on_gpu(fake, old), recent, _on_gpu(fake, recent)


def test_make_room_clears_the_allocator_cache_before_unloading_anything(tiny_sd, tiny_sdxl):
    fake = FakeDevice(total=16 * GiB)
    old, _, recent, _ = _two_holders(tiny_sd, tiny_sdxl, fake)
    fake.allocate(64 * MiB)
    fake.release(64 * MiB)  # reserved, not allocated: the allocator's cache
    _leave_free(fake, 0)
    assert make_room(32 * MiB, fake, "another") == []
    assert old.loaded and recent.loaded and fake.free_bytes() >= 32 * MiB


def test_make_room_reads_the_free_memory_again_after_each_unload(tiny_sd, tiny_sdxl):
    """An unload can free more than the weights counted (memory only the pipeline kept alive): the next holder stays
    when the first unload made enough room."""
    import torch

    fake = FakeDevice(total=16 * GiB)
    old, old_bytes, recent, _ = _two_holders(tiny_sd, tiny_sdxl, fake)
    old.pipe._scratch = fake.track(torch.empty(8 * MiB, dtype=torch.uint8), allocate=True)  # not a weight
    _leave_free(fake, 0)
    assert make_room(old_bytes + 4 * MiB, fake, "another") == [old.model]
    assert not old.loaded and recent.loaded


def test_make_room_unloads_nothing_when_all_of_them_would_not_be_enough(tiny_sd, tiny_sdxl, caplog):
    fake = FakeDevice(total=16 * GiB)
    old, old_bytes, recent, recent_bytes = _two_holders(tiny_sd, tiny_sdxl, fake)
    _leave_free(fake, 0)
    with caplog.at_level(logging.WARNING, logger="mlnb"):
        assert make_room(old_bytes + recent_bytes + MiB, fake, "another") == []
    assert old.loaded and recent.loaded
    assert "not enough; none unloaded" in caplog.text


def test_a_pipeline_unloaded_for_room_says_so_when_used_again(tiny_sd, tiny_sdxl):
    fake = FakeDevice(total=16 * GiB)
    old, old_bytes, _, _ = _two_holders(tiny_sd, tiny_sdxl, fake)
    _leave_free(fake, 0)
    make_room(old_bytes, fake, "the-new-one")
    with pytest.raises(mlnb.errors.InvalidArgumentError,
                       match=r"was unloaded to make room for 'the-new-one'; load it again with mlnb.load_pipeline"):
        old.generate("a fox", **FAST)


def test_asking_for_a_cached_pipeline_again_makes_it_the_last_to_go(tiny_sd, tiny_sdxl):
    fake = FakeDevice(total=16 * GiB)
    old, old_bytes, recent, _ = _two_holders(tiny_sd, tiny_sdxl, fake)
    assert mlnb.load_pipeline(tiny_sd, level="none", device=fake) is old
    assert [m for m, _ in holders(fake, besides="")] == [recent, old]


def test_unload_all_while_another_thread_generates_and_then_reads_the_cache_does_not_deadlock(tiny_sd):
    """A generation holds its pipeline's lock and then reads the cache (to make room); ``unload_all`` (``%vram
    free``, the dashboard's Free button) waits for that generation: it must not hold the cache's lock meanwhile."""
    from mlnb.pipeline import cached_pipelines as read_cache
    from mlnb.pipeline import unload_all

    managed = mlnb.load_pipeline(tiny_sd, level="none", device=FakeDevice())
    generating, done = threading.Event(), []

    def generation():
        with managed.hold():
            generating.set()
            threading.Event().wait(0.3)  # unload_all is waiting for this lock by now
            read_cache()
            done.append("generation")

    worker = threading.Thread(target=generation, daemon=True)
    worker.start()
    generating.wait(10)
    cleaner = threading.Thread(target=lambda: (unload_all(), done.append("unload_all")), daemon=True)
    cleaner.start()
    worker.join(10)
    cleaner.join(10)
    assert sorted(done) == ["generation", "unload_all"], "deadlock"
    assert not managed.loaded


class _BusyThenCtrlC:
    """A generation lock another thread holds, and a Ctrl-C while waiting for it."""

    def acquire(self, blocking=True):
        if not blocking:
            return False
        raise KeyboardInterrupt

    def release(self):
        raise AssertionError("never acquired")


def test_an_interrupted_unload_is_one_line_and_leaves_the_pipeline_cached_and_loaded(tiny_sd, monkeypatch, caplog):
    """Ctrl-C while ``unload`` waits for a generation (``%vram free`` beside the dashboard's): one line, and the
    pipeline is still in the cache (found, and unloaded by the next ``%vram free``), not an orphan holding memory
    that nothing lists. The wait itself is announced."""
    from mlnb.errors import UnloadInterrupted

    managed = mlnb.load_pipeline(tiny_sd, level="none", device=FakeDevice())
    monkeypatch.setattr(managed, "_generating", _BusyThenCtrlC())
    with caplog.at_level(logging.WARNING, logger="mlnb"), pytest.raises(UnloadInterrupted) as info:
        managed.unload()
    assert "\n" not in str(info.value) and "it stays loaded" in str(info.value)
    assert "is generating in another thread" in caplog.text and "unloading it waits" in caplog.text
    assert managed.loaded and managed in cached_pipelines()


def test_ctrl_c_while_a_generation_waits_for_another_thread_s_is_one_line(tiny_sd, monkeypatch):
    from mlnb.errors import GenerationInterrupted

    managed = mlnb.load_pipeline(tiny_sd, level="none", device=FakeDevice())
    monkeypatch.setattr(managed, "_generating", _BusyThenCtrlC())
    with pytest.raises(GenerationInterrupted, match="nothing was generated$"):
        managed.generate("a fox", **FAST)
    assert managed.loaded


def test_vram_free_interrupted_while_waiting_is_a_usage_error(tiny_sd, monkeypatch, ip):
    from IPython.core.error import UsageError

    managed = mlnb.load_pipeline(tiny_sd, level="none", device=FakeDevice())
    monkeypatch.setattr(managed, "_generating", _BusyThenCtrlC())
    with pytest.raises(UsageError, match="interrupted while waiting for the generation of .*; it stays loaded"):
        ip.run_line_magic("vram", "free")
    assert managed in cached_pipelines()


def test_auto_on_a_cuda_card_counts_what_cached_pipelines_hold_only_when_nothing_fits_the_free_memory(tiny_sd,
                                                                                                       tiny_sdxl):
    from mlnb.pipeline.files import load_diffusers_pipeline
    from mlnb.pipeline.loading import _choose
    from mlnb.setting import AUTO_SETTING

    import torch

    fake = FakeDevice(total=16 * GiB, cuda_like=True)
    other = mlnb.load_pipeline(tiny_sdxl, level="none", device=fake)
    other.pipe.unet.register_buffer("_held", torch.empty(640 * MiB, dtype=torch.uint8))  # a model of some size
    held = _on_gpu(fake, other) + fake.track(other.pipe.unet._held, allocate=True).numel()
    assert gpu_bytes(other) == held
    pipe = load_diffusers_pipeline(tiny_sd)
    _leave_free(fake, 8 * GiB)
    choice, plan, _ = _choose(pipe, AUTO_SETTING, fake, None)
    assert plan.budget == 8 * GiB and choice.reason.startswith("plan for the 8.0 GiB free: ")
    for free in (256 * MiB, 0):  # nothing fits what is free (0: a card full of cached models)
        _leave_free(fake, free)
        choice, plan, _ = _choose(pipe, AUTO_SETTING, fake, None)
        assert plan is not None and plan.budget == free + held
        assert "held by cached pipelines" in choice.reason


def test_the_same_from_pretrained_argument_given_as_none_is_a_cache_hit(tiny_sd):
    plain = mlnb.load_pipeline(tiny_sd, level="none")
    assert mlnb.load_pipeline(tiny_sd, level="none", variant=None) is plain


def test_a_level_none_load_on_a_cuda_card_makes_room_for_its_weights_and_activations(tiny_sd, tiny_sdxl, caplog):
    """Model A at none, model B with a budget (A unloaded or not), then A at none again: A's load must find room for
    its whole pipeline and an image's activations, not run out of memory beside B."""
    import torch

    from mlnb.levels import activation_reserve
    from mlnb.optimizer.weights import weight_bytes

    fake = FakeDevice(total=16 * GiB, cuda_like=True)
    other = mlnb.load_pipeline(tiny_sdxl, level="none", device=fake)
    other.pipe.unet.register_buffer("_held", torch.empty(1 * GiB, dtype=torch.uint8))
    _on_gpu(fake, other)
    fake.track(other.pipe.unet._held, allocate=True)
    _leave_free(fake, 256 * MiB)
    with caplog.at_level(logging.WARNING, logger="mlnb"):
        managed = mlnb.load_pipeline(tiny_sd, level="none", device=fake)
    assert not other.loaded and managed.loaded
    needed = weight_bytes(managed.pipe) + activation_reserve(64, 64, 1)
    assert f"it needs {mlnb.units.format_bytes(needed)}" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Host RAM, and one load at a time


def _reads(monkeypatch, watch):
    """Record what ``watch()`` says each time a pipeline's files are read."""
    from mlnb.pipeline import files

    seen = []
    original = files.load_diffusers_pipeline

    def reading(*args, **kwargs):
        seen.append(watch())
        return original(*args, **kwargs)

    monkeypatch.setattr(files, "load_diffusers_pipeline", reading)
    return seen


def test_the_old_copy_goes_before_the_read_only_when_host_ram_cannot_hold_both(tiny_sd, monkeypatch, caplog):
    """With room, the old copy stays until the new one has loaded (a failed load loses nothing); when host RAM cannot
    hold a second copy (Colab's 12.7 GB and SDXL), it is unloaded before the files are read."""
    import mlnb.device

    old = mlnb.load_pipeline(tiny_sd, level="none")
    seen = _reads(monkeypatch, lambda: old.loaded)
    mlnb.load_pipeline(tiny_sd, level="balanced")
    assert seen == [True] and not old.loaded
    old = mlnb.load_pipeline(tiny_sd, level="none")
    seen = _reads(monkeypatch, lambda: old.loaded)
    monkeypatch.setattr(mlnb.device, "host_memory", lambda: (8 * GiB, old.weight_bytes))
    with caplog.at_level(logging.WARNING, logger="mlnb"):
        mlnb.load_pipeline(tiny_sd, level="balanced")
    assert seen == [False]
    assert "before reading it again: host RAM has" in caplog.text


def test_two_threads_loading_read_one_model_at_a_time_and_share_a_cached_one(tiny_sd, tiny_sdxl, monkeypatch):
    reading, most = [0], [0]
    lock = threading.Lock()

    def count():
        with lock:
            reading[0] += 1
            most[0] = max(most[0], reading[0])
        threading.Event().wait(0.2)  # still reading when the other thread arrives
        with lock:
            reading[0] -= 1

    _reads(monkeypatch, count)
    results = {}
    threads = [threading.Thread(target=lambda k=k, m=m: results.__setitem__(k, mlnb.load_pipeline(m, level="none")))
               for k, m in (("a", tiny_sd), ("b", tiny_sd), ("c", tiny_sdxl))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert most[0] == 1
    assert results["a"] is results["b"] and results["c"].loaded


def test_the_rescue_loads_again_a_pipeline_unloaded_for_room_since_it_was_handed_out(tiny_sd, tiny_sdxl, caplog):
    """The magic (or the dashboard) loads A; before it generates, the other thread's load makes room and unloads A:
    the generation loads A again as it was asked for instead of failing."""
    fake = FakeDevice(total=16 * GiB)
    old, old_bytes, _, _ = _two_holders(tiny_sd, tiny_sdxl, fake)
    _leave_free(fake, 0)
    make_room(old_bytes, fake, "the-other-thread-s-model")
    with caplog.at_level(logging.WARNING, logger="mlnb"):
        result = generate_with_rescue(old, prompt="a fox", seed=1, **FAST)
    assert result.images and result.model == old.model and result.level is OptimizationLevel.NONE
    assert "loading it again" in caplog.text
    assert any(m.model == old.model and m.loaded for m in cached_pipelines())


def test_a_pickle_refusal_keeps_the_cached_copy_even_when_host_ram_is_short(tiny_sd_pickle, monkeypatch):
    """The refusal needs no memory: the cached pickle-read copy must not be unloaded to make host room first."""
    import mlnb.device
    from mlnb.errors import UnsafeWeightsError

    pickled = mlnb.load_pipeline(tiny_sd_pickle, level="none", allow_pickle=True)
    monkeypatch.setattr(mlnb.device, "host_memory", lambda: (8 * GiB, 1))
    with pytest.raises(UnsafeWeightsError):
        mlnb.load_pipeline(tiny_sd_pickle, level="none")
    assert pickled.loaded and pickled in cached_pipelines()


def test_status_names_a_planned_pipeline_s_budget(tiny_sd):
    from mlnb import session

    mlnb.load_pipeline(tiny_sd, budget="1GiB", device=FakeDevice())
    rows = dict(session.status(FakeDevice()).rows())
    assert "level none, plan for 1 GiB" in rows[f"pipeline {tiny_sd}"]
