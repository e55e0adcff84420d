"""The per-cell hooks on a fake shell built on IPython's real EventManager, with a fake GPU."""

from __future__ import annotations

import gc
import sys
import types
import weakref

import pytest
import torch
from IPython.core.events import EventManager, available_events
from IPython.core.interactiveshell import ExecutionResult

from mlnb.device import use_device
from mlnb.ipython.cell_monitor import CellMonitor
from mlnb.monitor import MemoryMonitor, cell_history, release
from mlnb.session import defaults
from mlnb.testing import FakeDevice


class FakeShell:
    """Just enough of an InteractiveShell for the hooks: events, a namespace, the last result."""

    def __init__(self) -> None:
        self.events = EventManager(self, available_events)
        self.user_ns: dict = {"Out": {}}
        self.execution_count = 1
        self.last_execution_result = None

    def run(self, source: str, body=None, store_history: bool = True):
        """Fire pre_run_cell, run ``body()`` (its exception is the cell's error), fire post_run_cell."""
        info = types.SimpleNamespace(raw_cell=source, store_history=store_history, silent=False, shell_futures=True,
                                     cell_id=None)
        self.events.trigger("pre_run_cell", info)
        result = ExecutionResult(info)
        try:
            if body is not None:
                result.result = body()
        except Exception as exc:
            result.error_in_exec = exc
            sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, exc.__traceback__
        self.last_execution_result = result
        self.events.trigger("post_run_cell", result)
        if store_history:  # as IPython: only a stored cell takes a number
            self.execution_count += 1
        return result


def hooked_shell(device):
    """A fake shell with a CellMonitor on ``device`` registered as mlnb registers it; the history cleared.
    Returns the shell, the monitor and the list of lines it echoes."""
    shell = FakeShell()
    lines: list[str] = []
    monitor = CellMonitor(shell, device=device, echo=lines.append)
    shell.events.register("pre_run_cell", monitor.pre_run_cell)
    shell.events.register("post_run_cell", monitor.post_run_cell)
    cell_history.clear()
    return shell, monitor, lines


@pytest.fixture
def setup():
    device = FakeDevice(total=4 * 2**30)
    shell, monitor, lines = hooked_shell(device)
    saved = (defaults.monitor, defaults.verbose)
    with use_device(device):
        yield shell, device, lines
    release.release_now()  # nothing left for the next test's device counts
    defaults.monitor, defaults.verbose = saved
    for name in ("last_type", "last_value", "last_traceback"):
        if hasattr(sys, name):
            setattr(sys, name, None)


def test_cell_without_gpu_is_silent_but_recorded(setup):
    shell, device, lines = setup
    shell.run("x = 1", lambda: None)
    assert lines == []
    (record,) = cell_history.records()
    assert record.cell == 1 and record.source == "x = 1" and not record.touched_gpu
    assert device.empty_cache_calls == 0


def test_gpu_cell_gets_a_line_and_the_cache_cleared_once_the_cell_has_ended(setup, monkeypatch):
    """Not in the hook: the cell's completion does not wait for the cache clear, which runs in the background."""
    shell, device, lines = setup
    monkeypatch.setattr(release, "CELL_DELAY", 0.3)

    def cell():
        device.allocate(512 * 2**20)
        device.release(512 * 2**20)

    shell.run("big = work()", cell)
    (record,) = cell_history.records()
    assert record.touched_gpu
    assert record.report.peak_allocated == 512 * 2**20
    assert record.report.freed is None and record.report.deferred  # nothing was freed yet
    assert device.empty_cache_calls == 0 and device.reserved == 512 * 2**20
    assert len(lines) == 1 and lines[0].startswith("[mlnb] cell 1 ·") and "peak 512.0 MiB" in lines[0]
    assert lines[0].endswith("freed when idle")
    assert record.row()[5] == "when idle"
    assert release.wait_idle(2.0)
    assert device.reserved == 0 and device.empty_cache_calls == 1  # reserved went back to the driver
    assert release.last_release().freed == 512 * 2**20


def test_a_frontend_s_own_execution_is_not_a_numbered_cell(setup):
    """``store_history=False`` (a variable inspector, a widget's callback) ran under the next cell's number: a line
    and a history row, then the real cell got the same number."""
    shell, device, lines = setup

    def cell():
        device.allocate(64 * 2**20)
        device.release(64 * 2**20)

    shell.run("inspect()", cell, store_history=False)
    assert lines == [] and len(cell_history) == 0
    shell.run("big = work()", cell)
    assert [r.cell for r in cell_history.records()] == [1] and len(lines) == 1


def test_verbose_prints_every_cell_and_off_records_nothing(setup):
    shell, device, lines = setup
    defaults.verbose = True
    shell.run("x = 1", lambda: None)
    assert len(lines) == 1
    defaults.verbose = False
    defaults.monitor = False
    shell.run("y = 2", lambda: None)
    assert len(cell_history) == 1 and len(lines) == 1


def test_error_cell_frames_pinning_gpu_tensors_are_cleared(setup):
    shell, device, lines = setup
    holder = {}

    def step():
        latents = device.track(torch.zeros(1024))
        holder["ref"] = weakref.ref(latents)
        raise RuntimeError("boom")

    shell.run("step()", step)
    gc.collect()
    assert holder["ref"]() is None, "the traceback still pins the tensor"
    (record,) = cell_history.records()
    assert record.error == "RuntimeError"
    assert any("cleared" in n and "traceback frame" in n for n in record.notes)
    assert any("%debug will not see" in line for line in lines)


def test_error_cell_without_gpu_tensors_keeps_its_frames(setup):
    shell, device, lines = setup

    def step():
        value = torch.zeros(4)  # not on the (fake) GPU
        raise ValueError(str(value.shape))

    shell.run("step()", step)
    tb = sys.last_traceback
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    assert any("value" in f.f_locals for f in frames), "frames without GPU tensors must stay for %debug"
    assert not cell_history.records()[0].notes


def test_output_pinning_gpu_tensor_is_reported(setup):
    shell, device, lines = setup
    shell.run("t", lambda: device.track(torch.zeros(256)))
    assert any("Out[1] pins" in line and "%vram free --outputs" in line for line in lines)


def test_gc_runs_only_when_it_can_free_something(setup, monkeypatch):
    """After an error at once; after a cell that ended holding more GPU memory than it started with, in the
    release once the cell has ended; never after a cell that did not touch the GPU."""
    shell, device, lines = setup
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(1) or 0)
    shell.run("x = 1", lambda: None)
    assert release.wait_idle(2.0) and calls == []  # nothing touched the GPU

    def grow():
        device.allocate(2**20)  # ends holding more than it started with

    shell.run("keep = alloc()", grow)
    assert release.wait_idle(2.0) and calls == [1]

    def fail():
        raise KeyError("x")

    shell.run("d['x']", fail)
    assert calls == [1, 1]  # at once, before any release


def test_a_release_beside_a_cell_does_not_make_it_a_gpu_cell(setup):
    """Reserved memory that went down during a cell is the release's doing (it runs in the background)."""
    shell, device, lines = setup
    device.allocate(64 * 2**20)
    device.release(64 * 2**20)
    shell.run("x = 1", lambda: device.empty_cache() and None)
    assert lines == [] and not cell_history.records()[-1].touched_gpu


def test_nested_generation_monitor_keeps_the_cell_peak(setup):
    """torch has one global peak counter: the inner monitor resets it, the cell's peak must survive."""
    shell, device, lines = setup

    def cell():
        device.allocate(300 * 2**20)
        device.release(300 * 2**20)
        with MemoryMonitor(device) as inner:
            device.allocate(100 * 2**20)
            device.release(100 * 2**20)
        assert inner.report.peak_allocated == 100 * 2**20

    shell.run("gen()", cell)
    (record,) = cell_history.records()
    assert record.report.peak_allocated == 300 * 2**20


def test_hook_failure_never_breaks_the_cell(setup, monkeypatch):
    shell, device, lines = setup
    monkeypatch.setattr(device, "snapshot", lambda: (_ for _ in ()).throw(RuntimeError("driver gone")))
    result = shell.run("x = 1", lambda: 42)
    assert result.result == 42 and result.error_in_exec is None


def test_a_cell_that_shows_its_own_report_gets_no_line_beside_it(setup):
    """Learnt from what the cell did, not from a flag a magic sets: a generation ended in it (``last_result()``
    changed), its value is ``%vram free``'s report, or it ended in a magic's one-line error. Its notes still show."""
    from IPython.core.error import UsageError

    from mlnb.pipeline import cache
    from mlnb.session import FreeReport

    shell, device, lines = setup
    before = cache.last_result()

    def generation():
        device.allocate(64 * 2**20)
        device.release(64 * 2**20)
        cache.remember(types.SimpleNamespace(report_line=lambda: "64×64 · 2 steps"))

    def free():
        device.allocate(64 * 2**20)
        device.release(64 * 2**20)
        return FreeReport(0, (), 0, 0, 64 * 2**20, 0, None, None)

    def failed():
        device.allocate(64 * 2**20)
        device.release(64 * 2**20)
        raise UsageError("out of GPU memory at level ultra for 64×64 ×1; try --num-images 2")

    try:
        shell.run("%%generate --quiet", generation)
        shell.run("%vram free", free)
        shell.run("%%generate --level ultra", failed)
        assert lines == []
        assert [r.touched_gpu for r in cell_history.records()] == [True, True, True]
        shell.run("again = work()", lambda: (device.allocate(64 * 2**20), device.release(64 * 2**20)) and None)
        assert len(lines) == 1 and lines[0].startswith("[mlnb] cell 4 ·")  # the same result: not this cell's
    finally:
        if before is not None:
            cache.remember(before)


def test_a_cell_that_did_not_touch_the_cuda_card_costs_no_synchronize_nvml_or_host_read(monkeypatch):
    """The per-cell hooks read the allocator's counters only: waiting for the card, asking NVML or reading the
    host's RSS would cost every cell time it does not need."""
    from fakes import FakeCuda
    from mlnb.device import CudaDevice, cuda as cuda_mod

    class IdleCuda(FakeCuda):  # nothing runs: the peaks are the current figures
        def max_memory_allocated(self, index=None):
            return self.memory_allocated(index)

        def max_memory_reserved(self, index=None):
            return self.memory_reserved(index)

    cuda = IdleCuda()
    monkeypatch.setattr(CudaDevice, "_cuda", staticmethod(lambda: cuda))
    reads = []

    class Nvml:
        def memory(self, index):
            reads.append("nvml")
            return None, None, "not here"

    monkeypatch.setattr(cuda_mod, "host_rss", lambda: reads.append("rss"))
    device = CudaDevice(0, nvml=Nvml())
    shell, monitor, lines = hooked_shell(device)
    for n in range(3):
        shell.run(f"x = {n}", lambda: None)
    assert "synchronize" not in cuda.calls and "empty_cache" not in cuda.calls
    assert reads == [] and lines == [] and len(cell_history) == 3
    assert cuda.stats_reads == 2 * 3  # one read of the allocator's table as a cell starts, one as it ends
    assert not release.pending()
