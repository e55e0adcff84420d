"""MemoryMonitor on the fake GPU and on the CPU: peaks, cleanup on every exit, nesting, reports; CellHistory."""

from __future__ import annotations

import types

import pytest
from IPython.lib.pretty import pretty

import mlnb.monitor.memory_monitor as monitor_mod
from mlnb.device import CpuDevice
from mlnb.monitor import CellHistory, CellRecord, MemoryMonitor, MemoryReport, cleanup
from mlnb.testing import FakeDevice
from mlnb.units import GiB, MiB

GPU_REPORT_FIELDS = ("start_allocated", "peak_allocated", "end_allocated", "start_reserved", "peak_reserved", "end_reserved")


@pytest.fixture
def dev():
    return FakeDevice(total=8 * GiB)


@pytest.fixture(autouse=True)
def collected(monkeypatch):
    """Record the monitor's ``gc.collect()`` calls instead of running them (a full collection in a session that
    has imported torch takes a tenth of a second, and these tests make hundreds of monitors)."""
    calls: list[int] = []
    monkeypatch.setattr(monitor_mod, "gc", types.SimpleNamespace(collect=lambda: calls.append(1)))
    return calls


def test_peak_covers_a_known_allocation(dev):
    """An allocation made and released inside the block shows in the peak, on top of what was there."""
    dev.allocate(GiB)  # resident before the block (weights)
    with MemoryMonitor(dev) as mon:
        dev.allocate(2 * GiB)
        assert mon.get_peak_memory() == 3 * GiB  # readable while open
        dev.release(2 * GiB)
    report = mon.report
    assert isinstance(report, MemoryReport) and report.gpu
    assert report.start_allocated == GiB
    assert report.peak_allocated == 3 * GiB
    assert report.end_allocated == GiB
    assert mon.get_peak_memory() == report.peak == 3 * GiB


def test_peak_from_before_the_block_is_not_counted(dev):
    """The monitor resets the peak on entry: an earlier spike does not leak into this block's peak."""
    dev.allocate(3 * GiB)
    dev.release(3 * GiB)
    with MemoryMonitor(dev) as mon:
        dev.allocate(GiB)
        dev.release(GiB)
    assert mon.report.peak_allocated == GiB


def test_exit_cleans_up_and_reports_what_was_freed(dev, collected):
    """The closing cleanup collects garbage and empties the cache: reserved drops to allocated and ``freed`` is
    the difference."""
    with MemoryMonitor(dev) as mon:
        dev.allocate(GiB + 512 * MiB)
        dev.release(GiB)
    report = mon.report
    assert collected == [1]
    assert dev.empty_cache_calls == 1
    assert report.end_allocated == 512 * MiB
    assert report.end_reserved == 512 * MiB
    assert report.peak_reserved == GiB + 512 * MiB
    assert report.freed == GiB
    assert report.cleanup == ("gc_collect", "cuda_cache_clear")
    assert report.error is None


def test_cleanup_can_be_turned_off(dev, collected):
    """``collect=False, empty_cache=False`` runs neither step; nothing is freed."""
    with MemoryMonitor(dev, collect=False, empty_cache=False) as mon:
        dev.allocate(GiB)
        dev.release(GiB)
    assert collected == [] and dev.empty_cache_calls == 0
    assert mon.report.cleanup == ()
    assert mon.report.freed == 0


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()], ids=["exception", "keyboard-interrupt"])
def test_cleanup_runs_on_error_and_the_error_propagates(dev, collected, error):
    """An exception or Ctrl-C inside the block still gets gc + cache clear and a report; it is not swallowed."""
    mon = MemoryMonitor(dev)
    with pytest.raises(type(error)):
        with mon:
            dev.allocate(GiB)
            dev.release(GiB)
            raise error
    assert collected == [1]
    assert dev.empty_cache_calls == 1
    assert dev.reserved == 0
    assert mon.report is not None
    assert mon.report.error == type(error).__name__
    assert mon.report.freed == GiB
    assert "ended by" in str(mon.report)


def test_failing_synchronize_does_not_stop_cleanup(dev):
    """After a failed kernel, synchronize can raise on exit; the cleanup and the report still happen."""

    class BrokenSync(FakeDevice):
        fail = False

        def synchronize(self):
            if self.fail:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

    dev = BrokenSync(total=8 * GiB)
    with pytest.raises(ValueError):
        with MemoryMonitor(dev) as mon:
            dev.allocate(GiB)
            dev.release(GiB)
            dev.fail = True
            raise ValueError("kernel failed")
    assert dev.empty_cache_calls == 1
    assert mon.report.freed == GiB


def test_monitor_closes_even_if_the_block_leaves_it_open(dev):
    """A monitor that exits is no longer among the open monitors (a later one does not fold into it)."""
    with MemoryMonitor(dev):
        pass
    assert not monitor_mod._open


# ---------------------------------------------------------------------------------------------------------------
# Nesting: torch has one global peak counter


@pytest.mark.parametrize(
    "before, inside, after",
    [(3, 1, 2), (1, 3, 2), (1, 2, 3)],
    ids=["max-before-inner", "max-inside-inner", "max-after-inner"],
)
def test_nested_monitors_each_report_their_true_peak(dev, before, inside, after):
    """The inner monitor resets the device's peak counter; the outer still reports the peak of its whole
    interval, wherever the largest allocation happened, and the inner reports its own."""
    dev.allocate(GiB)  # resident throughout
    with MemoryMonitor(dev) as outer:
        dev.allocate(before * 256 * MiB)
        dev.release(before * 256 * MiB)
        with MemoryMonitor(dev) as inner:
            dev.allocate(inside * 256 * MiB)
            dev.release(inside * 256 * MiB)
        dev.allocate(after * 256 * MiB)
        dev.release(after * 256 * MiB)
    assert inner.report.peak_allocated == GiB + inside * 256 * MiB
    assert outer.report.peak_allocated == GiB + max(before, inside, after) * 256 * MiB
    assert outer.report.peak_reserved >= outer.report.peak_allocated


def test_three_levels_of_nesting(dev):
    """Peaks fold through every open monitor, not only the direct parent."""
    with MemoryMonitor(dev) as a:
        with MemoryMonitor(dev) as b:
            with MemoryMonitor(dev) as c:
                dev.allocate(2 * GiB)
                dev.release(2 * GiB)
            dev.allocate(GiB)
            dev.release(GiB)
    assert c.report.peak_allocated == 2 * GiB
    assert b.report.peak_allocated == 2 * GiB
    assert a.report.peak_allocated == 2 * GiB


def test_outer_peak_while_inner_is_open(dev):
    """``get_peak_memory`` on the outer, read while the inner is open, includes the time before the inner."""
    with MemoryMonitor(dev) as outer:
        dev.allocate(2 * GiB)
        dev.release(2 * GiB)
        with MemoryMonitor(dev):
            dev.allocate(GiB)
            assert outer.get_peak_memory() == 2 * GiB
            dev.release(GiB)


def test_monitors_on_different_devices_do_not_mix():
    """A monitor on another device does not fold that device's peak into this one."""
    a, b = FakeDevice(total=8 * GiB), FakeDevice(total=8 * GiB)
    with MemoryMonitor(a) as outer:
        a.allocate(GiB)
        a.release(GiB)
        with MemoryMonitor(b):
            b.allocate(4 * GiB)
            b.release(4 * GiB)
    assert outer.report.peak_allocated == GiB


# ---------------------------------------------------------------------------------------------------------------
# CPU only


def test_cpu_monitor_reports_host_rss_and_na_gpu_fields():
    """Without a GPU the report carries host RSS, the GPU fields are None, and the peak is the host peak."""
    with MemoryMonitor(CpuDevice()) as mon:
        assert mon.get_peak_memory() is None  # not knowable until exit on a CPU
        block = b"\x01" * (64 * MiB)  # touched pages, so RSS really grows
        del block
    report = mon.report
    assert report.gpu is False
    for name in GPU_REPORT_FIELDS:
        assert getattr(report, name) is None, name
    assert report.device_used_start is None and report.device_total is None
    assert report.host_rss_start > 0 and report.host_rss_end > 0
    assert report.host_peak_rss >= max(report.host_rss_start, report.host_rss_end)
    assert report.peak == report.host_peak_rss == mon.get_peak_memory()
    assert report.cleanup == ("gc_collect",)  # no cache to clear on a CPU
    assert report.freed is not None and report.freed >= 0
    assert report.summary().startswith("host RSS peak ")


def test_default_device_is_the_current_one(fake_device):
    """Without an argument the monitor watches ``get_device()``."""
    with MemoryMonitor() as mon:
        fake_device.allocate(GiB)
        fake_device.release(GiB)
    assert mon.device is fake_device
    assert mon.report.peak_allocated == GiB


# ---------------------------------------------------------------------------------------------------------------
# Reports


def test_report_text_pretty_and_html(dev):
    """The report reads as a line plus a table in text, in IPython's pretty printer and as HTML."""
    dev.allocate(GiB)
    with MemoryMonitor(dev) as mon:
        dev.allocate(GiB)
        dev.release(GiB)
    report = mon.report
    assert report.summary() == "peak 2.0 / 8.0 GiB · freed 1.0 GiB"
    text = pretty(report)
    assert text == str(report)
    assert text.startswith("MemoryReport on Fake GPU: ")
    assert "allocated" in text and "reserved" in text and "host RSS" in text
    html = report._repr_html_()
    assert html.startswith("<table class='mlnb-memory'>")
    assert "<td>allocated</td><td>1.0 GiB</td><td>2.0 GiB</td><td>1.0 GiB</td>" in html
    assert "freed 1.0 GiB" in html
    assert "open" not in repr(mon) and "peak 2.0" in repr(mon)


def test_cpu_report_html_has_only_the_host_row():
    """A CPU report shows no GPU rows at all (not rows of N/A)."""
    with MemoryMonitor(CpuDevice()) as mon:
        pass
    html = mon.report._repr_html_()
    assert "host RSS" in html
    assert "allocated" not in html and "reserved" not in html
    assert "host RSS" in pretty(mon.report)


def test_report_html_escapes_the_device_name():
    """The device name goes into HTML escaped."""
    dev = FakeDevice(name="<b>GPU</b>")
    with MemoryMonitor(dev) as mon:
        pass
    assert "&lt;b&gt;GPU&lt;/b&gt;" in mon.report._repr_html_()
    assert "<b>GPU</b>" not in mon.report._repr_html_()


def test_cleanup_function(dev):
    """One cleanup phase returns the steps that ran."""
    assert cleanup(dev) == ["gc_collect", "cuda_cache_clear"]
    assert cleanup(dev, collect=False) == ["cuda_cache_clear"]
    assert cleanup(CpuDevice()) == ["gc_collect"]


# ---------------------------------------------------------------------------------------------------------------
# CellHistory


def _report(dev: FakeDevice, size: int) -> MemoryReport:
    with MemoryMonitor(dev) as mon:
        dev.allocate(size)
        dev.release(size)
    return mon.report


def test_cell_history_append_records_and_version(dev):
    """Records come back in order, ``last`` slices, ``version`` moves on every change, ``clear`` empties it."""
    history = CellHistory()
    assert len(history) == 0 and history.version == 0
    for n in range(1, 4):
        history.append(CellRecord(cell=n, source=f"cell {n}", report=_report(dev, n * MiB), touched_gpu=True))
    assert len(history) == 3 and history.version == 3
    assert [r.cell for r in history.records()] == [1, 2, 3]
    assert [r.cell for r in history.records(last=2)] == [2, 3]
    history.clear()
    assert len(history) == 0 and history.version == 4


def test_cell_history_is_bounded(dev):
    """Old records drop off past ``maxlen``."""
    history = CellHistory(maxlen=2)
    report = _report(dev, MiB)
    for n in range(5):
        history.append(CellRecord(cell=n, source="", report=report, touched_gpu=False))
    assert [r.cell for r in history.records()] == [3, 4]


def test_cell_record_rows_for_gpu_and_cpu(dev):
    """A GPU row shows allocated start/peak/end; a CPU row shows host RSS; the error type is shown."""
    dev.allocate(GiB)
    gpu = CellRecord(cell=7, source="x = big()", report=_report(dev, GiB), touched_gpu=True, error="ValueError")
    assert gpu.row() == ("7", f"{gpu.seconds:.2f}", "1.0 GiB", "2.0 GiB", "1.0 GiB", "1.0 GiB", "ValueError", "x = big()")
    assert len(gpu.row()) == len(CellHistory.HEADER)
    with MemoryMonitor(CpuDevice()) as mon:
        pass
    cpu = CellRecord(cell=8, source="print()", report=mon.report, touched_gpu=False)
    row = cpu.row()
    assert row[2].endswith("iB") and row[2] != "N/A"  # host RSS, not a GPU N/A
    assert row[6] == ""


def test_collect_if_needed_skips_the_full_collection_when_memory_came_back(dev, collected):
    """``collect="if_needed"``: the cache is cleared every time; ``gc.collect`` runs only when the block left more
    GPU memory allocated than it found, or ended in an error."""
    dev.allocate(GiB)
    with MemoryMonitor(dev, collect="if_needed") as mon:
        dev.allocate(GiB)
        dev.release(GiB)
    assert collected == [] and mon.report.cleanup == ("cuda_cache_clear",) and mon.report.freed == GiB
    assert (mon.report.held_after_clear, mon.report.collected) == (None, None)
    assert mon.report.cleanup_seconds is not None and mon.report.cleanup_seconds >= 0
    with MemoryMonitor(dev, collect="if_needed") as mon:
        dev.allocate(GiB)  # still held at the end (a cycle, say)
    assert collected == [1] and mon.report.cleanup == ("gc_collect", "cuda_cache_clear")
    assert (mon.report.held_after_clear, mon.report.collected) == (GiB, 0)  # live memory: the collection found none
    # Each step timed, the first cache clear too: which one costs is what a slow cleanup needs to know.
    assert [step for step, _ in mon.report.cleanup_timings] == ["cuda_cache_clear", "gc_collect", "cuda_cache_clear"]
    assert all(seconds >= 0 for _, seconds in mon.report.cleanup_timings)
    with pytest.raises(RuntimeError), MemoryMonitor(dev, collect="if_needed"):
        raise RuntimeError("boom")
    assert collected == [1, 1]
    with pytest.raises(ValueError, match="collect must be"):
        MemoryMonitor(dev, collect="sometimes")


def test_collect_if_needed_collects_only_after_an_error_without_memory_counters(collected):
    """On the CPU there is no GPU memory a collection could give back: a generation's 0.2 s full collection found
    nothing (diffusers' call leaves no cycles), so only an error, whose frames may hold tensors, collects."""
    with MemoryMonitor(CpuDevice(), collect="if_needed") as mon:
        pass
    assert collected == [] and mon.report.cleanup == ()
    with pytest.raises(RuntimeError), MemoryMonitor(CpuDevice(), collect="if_needed") as mon:
        raise RuntimeError("boom")
    assert collected == [1] and mon.report.cleanup == ("gc_collect",)


def test_collect_if_needed_reports_what_a_collection_gave_back(dev, monkeypatch):
    """A cycle holding device memory: the collection frees it, and the report says how much was held and freed."""
    dev.allocate(GiB)
    monkeypatch.setattr(monitor_mod, "gc", types.SimpleNamespace(collect=lambda: dev.release(256 * MiB)))
    with MemoryMonitor(dev, collect="if_needed") as mon:
        dev.allocate(256 * MiB)  # held by a cycle until the collection
    assert mon.report.cleanup == ("gc_collect", "cuda_cache_clear")
    assert (mon.report.held_after_clear, mon.report.collected) == (256 * MiB, 256 * MiB)
    assert mon.report.end_allocated == GiB


def test_a_monitor_used_again_measures_its_new_block_only(dev):
    mon = MemoryMonitor(dev)
    assert mon.get_peak_memory() is None and "not entered" in repr(mon)
    with mon:
        dev.allocate(GiB)
        dev.release(GiB)
    assert mon.report.peak_allocated == GiB
    with mon:
        dev.allocate(MiB)
        dev.release(MiB)
    assert mon.report.peak_allocated == MiB  # not the first block's GiB


def test_a_monitor_cannot_be_entered_while_open_nor_watch_something_that_is_not_a_device(dev):
    mon = MemoryMonitor(dev)
    with mon:
        with pytest.raises(RuntimeError, match="already open: nest a new MemoryMonitor"):
            mon.__enter__()
    assert mon.report is not None
    with pytest.raises(TypeError, match="device must be an mlnb Device .* got str"):
        MemoryMonitor("cuda")
