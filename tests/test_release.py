"""The deferred release: a generation leaves the cache clear for when the kernel is idle, on a fake GPU."""

from __future__ import annotations

import gc
import threading
import time

import pytest

import mlnb
from mlnb.device import use_device
from mlnb.errors import GenerationInterrupted
from mlnb.monitor import MemoryMonitor, release
from mlnb.testing import FakeDevice
from mlnb.units import MiB
from fakes import run_cell as run

FAST = dict(steps=1, width=64, height=64, seed=1)


@pytest.fixture(autouse=True)
def nothing_pending():
    release.release_now()
    yield
    release.release_now()


@pytest.fixture
def card():
    """A CUDA-like fake card installed as the current device, so that loads run their offload paths."""
    with use_device(FakeDevice(cuda_like=True)) as device:
        yield device


def activations(managed, device, nbytes: int = 256 * MiB, then=None):
    """Each denoiser forward allocates ``nbytes`` on the fake card and frees them, as activations do: the allocator
    keeps them cached. ``then()`` runs after (to raise, or to take time)."""

    def hook(*_):
        device.allocate(nbytes)
        device.release(nbytes)
        if then is not None:
            then()

    return managed.pipe.unet.register_forward_hook(hook)


def test_a_generation_leaves_its_cache_for_the_release(tiny_sd, clean_cache, card):
    managed = mlnb.load_pipeline(tiny_sd, level="balanced")
    activations(managed, card)
    calls = card.empty_cache_calls
    result = managed.generate("a fox", **FAST)
    assert card.empty_cache_calls == calls and card.reserved - card.allocated == 256 * MiB  # none on the path
    assert result.memory.deferred and result.memory.freed is None and result.memory.cached == 256 * MiB
    assert result.memory.peak_allocated >= 256 * MiB  # the peak is still measured
    assert result.report_line().endswith("· freed when idle") and release.pending()
    assert release.wait_idle(5.0)
    assert card.empty_cache_calls == calls + 1 and card.reserved == card.allocated
    assert release.last_release().freed == 256 * MiB


def test_back_to_back_generations_in_a_loop_pay_no_release_between_them(tiny_sd, clean_cache, card, monkeypatch):
    monkeypatch.setattr(release, "IDLE_DELAY", 0.5)
    managed = mlnb.load_pipeline(tiny_sd, level="balanced")
    activations(managed, card)
    calls = card.empty_cache_calls
    for seed in range(3):
        managed.generate("a fox", **{**FAST, "seed": seed})
        assert card.empty_cache_calls == calls
    assert release.wait_idle(5.0) and card.empty_cache_calls == calls + 1


def test_a_generation_starting_while_a_release_is_pending_cancels_it(tiny_sd, clean_cache, card, monkeypatch):
    """The first generation's release is due 0.2 s after it ends; the second starts before that and runs longer:
    nothing is released under it, and one release follows it."""
    monkeypatch.setattr(release, "IDLE_DELAY", 0.2)
    managed = mlnb.load_pipeline(tiny_sd, level="balanced")
    managed.generate("a fox", **FAST)  # the first call's warm-up, before the hooks
    release.release_now()
    hook = activations(managed, card)
    calls = card.empty_cache_calls
    managed.generate("a fox", **FAST)
    assert release.pending()
    hook.remove()
    activations(managed, card, then=lambda: time.sleep(0.3))  # each forward outlasts the delay
    managed.generate("a fox", **FAST)
    assert card.empty_cache_calls == calls
    assert release.wait_idle(5.0) and card.empty_cache_calls == calls + 1


@pytest.mark.parametrize("error, raised", [(RuntimeError("a kernel failed"), RuntimeError),
                                           (KeyboardInterrupt(), GenerationInterrupted)])
def test_an_error_in_a_generation_still_cleans_up_at_once(tiny_sd, clean_cache, card, error, raised):
    managed = mlnb.load_pipeline(tiny_sd, level="balanced")

    def fail():
        raise error

    activations(managed, card, then=fail)
    calls = card.empty_cache_calls
    with pytest.raises(raised):
        managed.generate("a fox", **FAST)
    assert card.empty_cache_calls == calls + 1 and card.reserved == card.allocated  # before any idle point
    assert not release.pending()


def test_a_generation_waits_for_a_release_that_is_running():
    """A generation start and the release exclude each other: the start returns once the release has ended."""
    device = FakeDevice()
    started, go = threading.Event(), threading.Event()

    def slow_hook():
        started.set()
        go.wait(5.0)

    remove = release.add_idle_hook(slow_hook)
    try:
        with MemoryMonitor(device, defer=True):
            device.allocate(MiB)
            device.release(MiB)
        worker = threading.Thread(target=release.release_now)
        worker.start()
        assert started.wait(5.0)
        entered = threading.Event()

        def generate():
            with MemoryMonitor(device, defer=True):
                entered.set()

        generation = threading.Thread(target=generate)
        generation.start()
        assert not entered.wait(0.2)  # held back while the release runs
        go.set()
        assert entered.wait(5.0)
        worker.join(5.0)
        generation.join(5.0)
    finally:
        go.set()
        remove()


def test_idle_hooks_run_first_and_a_bound_method_is_held_weakly():
    device = FakeDevice()
    order = []

    class Streamer:
        def drop_slots(self) -> None:
            order.append(("hook", device.empty_cache_calls))

    streamer = Streamer()
    release.add_idle_hook(streamer.drop_slots)
    remove = release.add_idle_hook(lambda: (_ for _ in ()).throw(RuntimeError("a hook failed")))
    with MemoryMonitor(device, defer=True):
        device.allocate(MiB)
        device.release(MiB)
    (done,) = release.release_now()
    assert order == [("hook", 0)] and device.empty_cache_calls == 1  # the hook ran before the cache clear
    assert done.hooks == 1 and done.freed == MiB  # the failing hook did not stop the release
    del streamer
    gc.collect()
    with MemoryMonitor(device, defer=True):
        device.allocate(MiB)
        device.release(MiB)
    (done,) = release.release_now()
    assert done.hooks == 0 and order == [("hook", 0)]
    remove()
    with pytest.raises(TypeError, match="hook must be callable"):
        release.add_idle_hook("streamer.release")


def test_the_release_collects_only_when_more_is_allocated_than_before_the_generations(monkeypatch):
    device = FakeDevice()
    collections = []
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(1) or 0)
    device.allocate(MiB)
    with MemoryMonitor(device, defer=True, collect="if_needed"):
        device.allocate(MiB)
        device.release(MiB)
    (done,) = release.release_now()
    assert collections == [] and not done.collected
    with MemoryMonitor(device, defer=True, collect="if_needed"):
        device.allocate(MiB)  # held at the end (a cycle, say)
    (done,) = release.release_now()
    assert collections == [1] and done.collected and "with gc.collect" in str(done)
    with MemoryMonitor(device, defer=True, collect=False, empty_cache=False):  # the techniques turned off
        device.allocate(MiB)
    calls = device.empty_cache_calls
    release.release_now()
    assert collections == [1] and device.empty_cache_calls == calls


def test_nothing_is_deferred_without_memory_counters():
    from mlnb.device import CpuDevice

    with MemoryMonitor(CpuDevice(), defer=True, collect="if_needed") as mon:
        pass
    assert not mon.report.deferred and mon.report.freed is not None and not release.pending()


def test_a_generate_cell_at_an_offload_level_gives_the_cache_back_within_a_second_of_its_end(ip, tiny_sd, clean_cache,
                                                                                             card, fresh_defaults):
    managed = mlnb.load_pipeline(tiny_sd, level="balanced")  # model offload (group offload needs a real card)
    activations(managed, card)
    calls = card.empty_cache_calls
    result = run(ip, f"%%generate --model {tiny_sd} --level balanced --steps 1 --width 64 --height 64 --seed 1 "
                     "--quiet --out r\na fox")
    ended = time.perf_counter()
    assert result.success and ip.user_ns["r"].memory.deferred
    while card.reserved - card.allocated > 64 * MiB and time.perf_counter() - ended < 5.0:
        time.sleep(0.01)
    assert card.reserved - card.allocated <= 64 * MiB
    assert time.perf_counter() - ended <= 1.0
    assert release.wait_idle(5.0) and card.empty_cache_calls == calls + 1  # the cell's and the generation's, once


def test_generations_in_one_cell_are_released_once_after_it(ip, tiny_sd, clean_cache, card, fresh_defaults,
                                                            monkeypatch):
    monkeypatch.setattr(release, "IDLE_DELAY", 0.0)  # outside a cell it would run at once
    ip.user_ns["_managed"] = managed = mlnb.load_pipeline(tiny_sd, level="balanced")
    activations(managed, card)
    ip.user_ns["_counts"] = counts = []
    calls = card.empty_cache_calls
    source = ("for seed in range(3):\n"
              "    _managed.generate('a fox', steps=1, width=64, height=64, seed=seed)\n"
              "    __import__('time').sleep(0.1)\n"
              "    _counts.append(_managed.device.empty_cache_calls)")
    assert run(ip, source).success
    assert counts == [calls] * 3
    assert release.wait_idle(5.0) and card.empty_cache_calls == calls + 1
    del ip.user_ns["_managed"], ip.user_ns["_counts"]


def test_vram_status_says_what_the_last_release_gave_back(ip, card):
    with MemoryMonitor(card, defer=True):
        card.allocate(64 * MiB)
        card.release(64 * MiB)
    release.release_now()
    rows = dict(ip.run_line_magic("vram", "").rows())
    assert rows["last idle release"].startswith("freed 64.0 MiB when idle")
