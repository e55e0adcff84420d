"""The dashboard driven from pytest: outside a kernel the widgets' comms are no-ops, so traits can be read back.

Runs on ipywidgets 7.7.1 and 8.x alike.
"""

from __future__ import annotations

import html
import subprocess
import sys
import time

import pytest

from mlnb.device import CpuDevice, use_device
from mlnb.monitor.history import CellHistory, CellRecord
from mlnb.monitor.memory_monitor import MemoryReport
from mlnb.pipeline import cached_pipelines
from mlnb.testing import FakeDevice
from mlnb.setting import MemorySetting
from mlnb.units import GiB, MiB
from mlnb.widgets.state import Gauge, HistoryPoint, gauge_state, history_points, history_table_html, one_line

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # Image.value is bytes on ipywidgets 7, a memoryview on 8


@pytest.fixture
def session_defaults():
    """The session defaults, restored after the test."""
    from mlnb.session import defaults

    saved = (defaults.setting, defaults.model)
    yield defaults
    defaults.setting, defaults.model = saved


@pytest.fixture
def board_factory(session_defaults):
    """Build dashboards without the updater thread (tests call refresh()); all are closed afterwards."""
    pytest.importorskip("ipywidgets")
    import mlnb

    boards = []

    def make(**kwargs):
        kwargs.setdefault("start", False)
        board = mlnb.dashboard(**kwargs)
        boards.append(board)
        return board

    yield make
    for board in boards:
        board.close()


def _report(peak: int, gpu: bool = True) -> MemoryReport:
    return MemoryReport(
        gpu=gpu, device_name="Fake GPU", seconds=0.5,
        start_allocated=0, peak_allocated=peak, end_allocated=0,
        start_reserved=0, peak_reserved=peak, end_reserved=0,
        device_used_start=0, device_used_end=0, device_total=4 * GiB,
        host_rss_start=GiB, host_peak_rss=GiB, host_rss_end=GiB, freed=peak,
    )


# -- pure state --------------------------------------------------------------------------------------------------


def test_gauge_state_from_fake_device():
    device = FakeDevice(total=4 * GiB, other_processes=GiB)
    device.allocate(2 * GiB)
    state = gauge_state(device.info(), MemorySetting.parse("auto"), [("/models/tiny-sd", "ultra"), ("org/name", "none")])
    nvml, reserved, host = state.gauges
    assert nvml.used == 3 * GiB and nvml.total == 4 * GiB
    assert nvml.fraction == pytest.approx(0.75) and nvml.bar_style == "warning"
    assert reserved.used == 2 * GiB and "allocated 2.0 GiB" in reserved.text
    assert host.available
    assert state.gpu and state.level.startswith("auto, now ultra")
    assert state.loaded == "tiny-sd at ultra, org/name at none"  # local folders by their name
    text = str(state)
    assert "3.0 GiB / 4.0 GiB (75%)" in text and "Fake GPU" in text


def test_gauge_state_without_gpu_or_nvml():
    state = gauge_state(CpuDevice().info(), MemorySetting.parse("balanced"))
    assert not state.gpu and state.headline.startswith("no GPU")
    assert [g.text for g in state.gauges[:2]] == ["N/A (no GPU)", "N/A (no GPU)"]
    assert state.level == "balanced (set by the user)" and state.loaded == "none"

    broken = gauge_state(FakeDevice(nvml_fails=True).info())
    assert broken.gauges[0].text == "N/A (NVML query failed: simulated)"
    assert broken.gauges[1].available  # torch's counters still work


def test_gauge_styles():
    assert Gauge("x", 1, 10).bar_style == ""
    assert Gauge("x", 95, 100).bar_style == "danger"
    assert Gauge("x", None, None).fraction == 0.0


def test_history_table_and_plot():
    from mlnb.widgets.plot import history_png

    records = [CellRecord(3, "pipe = load()", _report(GiB), True), CellRecord(4, "1/0", _report(0), False, "ZeroDivisionError")]
    table = history_table_html(records, last=8)
    assert table.index("<td style='padding:0 6px'>4</td>") < table.index("<td style='padding:0 6px'>3</td>")  # newest first
    assert "ZeroDivisionError" in table and "color:#b00" in table
    assert "no cells recorded" in history_table_html([])
    points = history_points(records)
    assert points[0] == HistoryPoint(3, GiB, True, False) and points[1].error
    assert history_png([]) is None
    pytest.importorskip("matplotlib")
    assert history_png(points).startswith(PNG_MAGIC)


def test_one_line_errors():
    from mlnb.errors import ModelNotFoundError

    assert one_line(ModelNotFoundError("model 'x' not found\nmore")) == "model 'x' not found"
    assert one_line(RuntimeError("boom")) == "RuntimeError: boom"


def test_form_args():
    pytest.importorskip("ipywidgets")
    from mlnb.errors import InvalidArgumentError
    from mlnb.pipeline import GenerationArgs
    from mlnb.widgets.generate_panel import form_args

    assert form_args("a fox", " ", 2, "7", "64", "") == GenerationArgs(
        prompt="a fox", negative_prompt=None, steps=2, seed=7, width=64, height=None
    )
    with pytest.raises(InvalidArgumentError, match="seed must be a whole number"):
        form_args("a fox", "", 2, "seven", "", "")
    # generate's own rules, before any model is loaded (they were checked only after loading it)
    with pytest.raises(InvalidArgumentError, match="the prompt is empty: type it in the prompt field"):
        form_args("  ", "", 2, "", "", "")
    with pytest.raises(InvalidArgumentError, match="width must be a positive multiple of 8, got 60"):
        form_args("a fox", "", 2, "", "60", "")
    with pytest.raises(InvalidArgumentError, match="steps must be a whole number >= 1, got 0"):
        form_args("a fox", "", 0, "", "", "")


# -- the panel ----------------------------------------------------------------------------------------------------


def test_gauges_follow_fake_device(board_factory, fake_device):
    board = board_factory()
    nvml_row, reserved_row, host_row = board.gauge_rows
    assert "Fake GPU" in board.headline.value
    assert nvml_row.bar.value == 0.0
    fake_device.allocate(3 * GiB + 700 * MiB)
    board.refresh()
    assert nvml_row.bar.value == pytest.approx((3 * GiB + 700 * MiB) / (4 * GiB))
    assert nvml_row.bar.bar_style == "danger"
    assert nvml_row.figures.value == board.state.gauges[0].text
    assert "3.7 GiB / 4.0 GiB" in reserved_row.figures.value
    assert host_row.bar.value > 0
    assert "auto, now ultra" in board.level_info.value


def test_no_gpu_gauges_say_so(board_factory):
    with use_device(CpuDevice()):
        board = board_factory()
    assert "no GPU" in board.headline.value
    assert board.gauge_rows[0].figures.value == "N/A (no GPU)"


def test_controls_set_session_defaults(board_factory, session_defaults, fake_device):
    board = board_factory()
    board.level.value = "aggressive"
    assert session_defaults.setting == MemorySetting.of_level("aggressive")
    board.model.value = " some/model "
    assert session_defaults.model == "some/model"
    board.model.value = ""
    assert session_defaults.model is None
    # Changes made elsewhere (%vram level, %%generate --model) show on the next refresh.
    session_defaults.setting = MemorySetting.parse("none")
    session_defaults.model = "other/model"
    board.refresh()
    assert board.level.value == "none" and board.model.value == "other/model"
    assert "none (set by the user)" in board.level_info.value


def test_the_level_box_takes_a_level_or_a_budget_and_shows_the_session_s(board_factory, session_defaults, fake_device):
    """As ``%vram level``: a level from the list, or a budget typed in; a mistake is one line and changes nothing.
    A budget set elsewhere shows as the session keeps it, and showing it sets nothing back."""
    board = board_factory()
    board.level.value = "2GiB"
    assert session_defaults.setting.budget == 2 * GiB and not board.control_error.value
    board.refresh()
    assert board.level.value == "2 GiB" and "2 GiB budget (set by the user)" in board.level_info.value
    board.level.value = "turbo"
    assert "or a VRAM budget such as 4GiB" in board.control_error.value and session_defaults.setting.budget == 2 * GiB
    session_defaults.setting = MemorySetting.parse("4GiB")
    board.refresh()
    assert board.level.value == "4 GiB" and str(session_defaults.setting) == "4 GiB"
    board.level.value = "ultra"  # the user's choice is handed on
    assert session_defaults.setting == MemorySetting.of_level("ultra") and not board.control_error.value


@pytest.mark.parametrize("typed, shown, budget", [
    ("3.75GiB", "3.75 GiB", 4_026_531_840),
    ("1500MiB", "1500 MiB", 1_572_864_000),
])
def test_a_budget_typed_in_the_level_box_is_shown_as_typed_and_generate_plans_to_the_byte(
        board_factory, session_defaults, tiny_sd, clean_cache, typed, shown, budget):
    """The box reads a budget once: the session keeps its exact bytes and the user's number and unit; the box, the
    level line and the Generate panel's plan say it back as typed."""
    board = board_factory()
    board.level.value = typed
    assert session_defaults.setting.budget == budget and not board.control_error.value
    board.refresh()
    assert board.level.value == shown and f"{shown} budget (set by the user)" in board.level_info.value
    session_defaults.model = str(tiny_sd)
    panel = _click_generate(board, steps=1)
    assert panel.wait(timeout=120), "generation did not finish in 120 s"
    assert panel.error is None, panel.error
    assert panel.result.plan.budget == budget and f"plan for {shown}: " in panel.report.value
    assert any(note.startswith(f"plan for {shown}: ") for note in panel.notes), panel.notes


def test_history_redrawn_only_when_version_changes(board_factory, fake_device):
    history = CellHistory()
    board = board_factory(history=history)
    assert "no cells recorded" in board.table.value
    assert board.plot.layout.display == "none"
    history.append(CellRecord(1, "x = 1", _report(GiB), True))
    board.refresh()
    draws = board._plot.draws
    board.refresh()
    board.refresh()
    assert board._plot.draws == draws
    assert "x = 1" in board.table.value
    pytest.importorskip("matplotlib")
    assert bytes(board.plot.value).startswith(PNG_MAGIC) and board.plot.layout.display is None


def test_free_memory_button(board_factory, fake_device, clean_cache):
    board = board_factory()
    board.free_button.click()
    assert "unloaded 0 pipeline(s)" in board.free_result.value
    assert fake_device.empty_cache_calls >= 1


def _click_generate(board, steps: int):
    """Fill the Generate form (64×64, seed 1) and click; returns the panel, its generation started."""
    panel = board.generate_panel
    panel.prompt.value = "a watercolor fox"
    panel.steps.value, panel.seed.value, panel.width.value, panel.height.value = steps, "1", "64", "64"
    panel.button.click()
    return panel


def test_generate_tiny_model(board_factory, session_defaults, tiny_sd, clean_cache):
    import mlnb

    session_defaults.model = str(tiny_sd)
    session_defaults.setting = MemorySetting.parse("none")
    board = board_factory()
    panel = _click_generate(board, steps=2)
    assert panel.button.disabled and board.free_button.disabled
    assert panel.wait(timeout=120), "generation did not finish in 120 s"
    assert panel.error is None, panel.error
    assert bytes(panel.image.value).startswith(PNG_MAGIC) and panel.image.layout.display is None
    assert "64×64 · 2 steps" in panel.report.value and "level none" in panel.report.value
    assert panel.progress.value == panel.progress.max == 2
    assert mlnb.last_result() is panel.result and panel.result.seed == 1
    assert not panel.button.disabled and not board.free_button.disabled
    board.refresh()
    assert f"{tiny_sd.name} at none" in board.level_info.value


def test_generate_plans_for_the_session_s_budget(board_factory, session_defaults, tiny_sd, clean_cache, capfd):
    """The plan's line, a warning of the generation thread, goes to the panel: written to stderr, a kernel would
    put it into whichever cell runs at that moment."""
    session_defaults.model = str(tiny_sd)
    session_defaults.setting = MemorySetting.parse("3GiB")
    capfd.readouterr()
    panel = _click_generate(board_factory(), steps=1)
    assert panel.wait(timeout=120), "generation did not finish in 120 s"
    assert panel.error is None, panel.error
    assert panel.result.plan is not None and panel.result.plan_line().startswith("plan for 3 GiB")
    assert any(note.startswith("plan for 3 GiB") for note in panel.notes), panel.notes
    assert "plan for 3 GiB" in panel.status.value
    assert "plan for" not in capfd.readouterr().err


def test_generate_errors_keep_panel_usable(board_factory, session_defaults, tiny_sd, clean_cache):
    session_defaults.setting = MemorySetting.parse("none")
    board = board_factory()
    panel = board.generate_panel
    panel.steps.value, panel.width.value, panel.height.value = 1, "64", "64"
    cases = [  # (prompt, model, seed, the error line shows)
        ("", str(tiny_sd), "", "the prompt is empty: type it in the prompt field"),
        ("a fox", "/nonexistent/model-folder", "", "no model folder at '/nonexistent/model-folder'"),
        ("a fox", None, "", "no model"),
        ("a fox", str(tiny_sd), "x", "seed must be a whole number"),
    ]
    for prompt, model, seed, message in cases:
        session_defaults.model = model
        panel.prompt.value, panel.seed.value = prompt, seed
        panel.button.click()
        assert panel.wait(timeout=60)
        assert panel.error is not None and message in panel.error, (message, panel.error)
        assert "error:" in panel.status.value and html.escape(message) in panel.status.value
        assert not panel.button.disabled and not board.free_button.disabled
        assert bytes(panel.image.value) == b""
    assert cached_pipelines() == []  # every form error was caught before anything loaded


def test_unexpected_error_is_one_line_and_never_escapes_the_thread(board_factory, session_defaults, monkeypatch):
    import threading

    from mlnb.pipeline import loading

    def broken_load(*args, **kwargs):
        raise RuntimeError("driver exploded\nsecond line")

    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    monkeypatch.setattr(loading, "load", broken_load)
    session_defaults.model = "org/model"
    panel = board_factory().generate_panel
    panel.prompt.value = "a fox"
    panel.button.click()
    assert panel.wait(timeout=30)
    assert panel.error == "RuntimeError: driver exploded"
    assert not panel.button.disabled and not escaped


def test_a_library_s_python_warning_in_the_generate_thread_stays_on_the_panel(board_factory, session_defaults,
                                                                               monkeypatch):
    """diffusers and transformers call warnings.warn while loading: from the worker, Python printed it into whichever
    cell was running. It is kept with what they log (``library_notes``), not shown in the status line."""
    import warnings

    from mlnb.pipeline import loading

    def warning_load(*args, **kwargs):
        warnings.warn("`upcast_vae` is deprecated", FutureWarning)
        raise RuntimeError("stop here")

    monkeypatch.setattr(loading, "load", warning_load)
    session_defaults.model = "org/model"
    panel = board_factory().generate_panel
    panel.prompt.value = "a fox"
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # the run's -W ignore would hide it
        panel.button.click()
        assert panel.wait(timeout=30)
    assert panel.library_notes == ["FutureWarning: `upcast_vae` is deprecated"]
    assert panel.error == "RuntimeError: stop here" and "upcast_vae" not in panel.status.value


def test_updater_thread_stops_on_close(board_factory, fake_device):
    import mlnb.widgets

    board = board_factory(interval=0.05, start=True)
    assert board.running
    fake_device.allocate(GiB)
    deadline = time.monotonic() + 5
    while board.gauge_rows[0].bar.value == 0.0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert board.gauge_rows[0].bar.value == pytest.approx(0.25)  # moved by the thread
    other = mlnb.widgets.panel.Dashboard(interval=0.05)  # the class itself leaves the first board open
    assert mlnb.widgets.close_all() == 2
    assert not board.running and not other.running and board.comm is None
    assert mlnb.widgets.close_all() == 0


def test_thread_stops_when_ipywidgets_closes_the_panel(board_factory, fake_device):
    import ipywidgets

    board = board_factory(interval=0.05, start=True)
    ipywidgets.Widget.close(board)  # the base close, as a frontend-driven close would leave it
    board._thread.join(timeout=5)
    assert not board.running


def test_dashboard_without_ipywidgets(monkeypatch):
    import mlnb
    import mlnb.widgets as mw

    monkeypatch.setattr(mw, "_ipywidgets", mw._UNTRIED)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # makes `import ipywidgets` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "mlnb\[widgets\]"'):
        mlnb.dashboard()
    with pytest.raises(ImportError, match="pip install ipywidgets"):
        mw.dashboard()
    assert mw._ipywidgets is None  # tried once, remembered
    assert isinstance(mw.close_all(), int)


def test_import_stays_light():
    code = "import sys, mlnb, mlnb.widgets; mlnb.widgets.close_all(); assert 'ipywidgets' not in sys.modules; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("interval", [0, -1, "1", float("nan"), True])
def test_a_dashboard_refuses_an_interval_that_would_spin_or_kill_its_thread(interval, recwarn):
    pytest.importorskip("ipywidgets")
    import mlnb

    with pytest.raises(ValueError, match="interval must be a number of seconds of at least 0.01"):
        mlnb.dashboard(interval=interval, start=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        mlnb.dashboard(colour="red")
    import gc

    gc.collect()  # a refused panel leaves nothing that complains when it is collected


def test_closing_a_dashboard_closes_every_model_it_made(board_factory):
    """Layouts and styles are widgets with comms of their own: left open, each closed dashboard kept about 70 models in
    the kernel and in the notebook's saved widget state."""
    import ipywidgets

    instances = getattr(ipywidgets.widgets.widget, "_instances", None)  # ipywidgets 8
    if instances is None:  # 7.x
        instances = ipywidgets.Widget.widgets
    before = set(instances)
    board = board_factory()
    made = set(instances) - before
    assert len(made) > 20
    board.close()
    assert not (set(instances) & made), sorted({type(instances[k]).__name__ for k in set(instances) & made})


def test_a_new_dashboard_closes_the_ones_before_it(board_factory, fake_device):
    """Re-running ``mlnb.dashboard()`` (or ``%vram dashboard``): each board polled the device until the kernel ended,
    and every run added one. The new board closes the ones before it; a refused call closes nothing."""
    import mlnb
    import mlnb.widgets

    first = board_factory(interval=0.05, start=True)
    idle = board_factory()  # open, its updater not started: closed too
    second = board_factory(interval=0.05, start=True)
    assert not first.running and first.comm is None and idle.comm is None
    assert second.running and mlnb.widgets.panel.live_dashboards() == [second]
    with pytest.raises(ValueError, match="interval must be"):
        mlnb.dashboard(interval=0)
    assert second.running and second.comm is not None
    assert mlnb.widgets.close_all() == 1 and not second.running


def test_a_generation_goes_on_when_a_new_dashboard_replaces_its_board(board_factory, session_defaults, tiny_sd,
                                                                      clean_cache, monkeypatch):
    """The replaced board's Generate thread cannot be stopped mid-step: it finishes, and its result is
    ``mlnb.last_result()``; nothing escapes the thread."""
    import threading

    import mlnb
    from mlnb.pipeline import loading as loading_mod

    loading, release = threading.Event(), threading.Event()
    load = loading_mod.load

    def slow_load(*args, **kwargs):
        loading.set()
        assert release.wait(30)
        return load(*args, **kwargs)

    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    monkeypatch.setattr(loading_mod, "load", slow_load)
    session_defaults.model = str(tiny_sd)
    session_defaults.setting = MemorySetting.parse("none")
    old = board_factory()
    panel = _click_generate(old, steps=1)
    assert loading.wait(30)
    board_factory()
    assert old.comm is None and panel.running
    release.set()
    assert panel.wait(timeout=120), "generation did not finish in 120 s"
    assert panel.error is None and not escaped, (panel.error, escaped)
    assert mlnb.last_result() is panel.result is not None
