"""One real IPython shell (``IPython.testing.globalipapp``): a round trip per magic on the tiny pipelines."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import mlnb
from mlnb.device import use_device
from mlnb.monitor import cell_history
from mlnb.session import defaults
from mlnb.testing import FakeDevice
from mlnb.setting import MemorySetting
from fakes import run_cell as run
from fakes import usage_error


pytestmark = pytest.mark.usefixtures("fresh_defaults")


def gen_cell(model, extra: str = "", prompt: str = "a watercolor fox") -> str:
    return f"%%generate --model {model} --steps 2 --width 64 --height 64 --quiet {extra}\n{prompt}"


def test_load_prints_one_line_and_reload_never_stacks(ip, capsys):
    ip.run_line_magic("reload_ext", "mlnb")
    out = capsys.readouterr().out.strip()
    assert out.startswith("mlnb ") and "auto level" in out and out.count("\n") == 0
    for _ in range(10):
        ip.run_line_magic("reload_ext", "mlnb")
    for event in ("pre_run_cell", "post_run_cell"):
        ours = [cb for cb in ip.events.callbacks[event] if getattr(cb, "__self__", None).__class__.__name__ == "CellMonitor"]
        assert len(ours) == 1, (event, ip.events.callbacks[event])


def test_unload_removes_exactly_what_load_added(ip):
    shell = ip
    before = {e: list(shell.events.callbacks[e]) for e in ("pre_run_cell", "post_run_cell")}
    shell.run_line_magic("unload_ext", "mlnb")
    assert "generate" not in shell.magics_manager.magics["cell"]
    assert "vram" not in shell.magics_manager.magics["line"]
    for event, callbacks in before.items():
        assert len(shell.events.callbacks[event]) == len(callbacks) - 1
    shell.run_line_magic("load_ext", "mlnb")
    assert "generate" in shell.magics_manager.magics["cell"]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_generate_round_trip_same_seed_same_image(ip, kind, request):
    folder = request.getfixturevalue(f"tiny_{kind}")
    assert run(ip, gen_cell(folder, "--seed 3 --out r1")).error_in_exec is None
    assert run(ip, gen_cell(folder, "--seed 3 --out r2")).error_in_exec is None
    assert run(ip, gen_cell(folder, "--seed 4 --out r3")).error_in_exec is None
    r1, r2, r3 = (ip.user_ns[n] for n in ("r1", "r2", "r3"))
    assert r1.images[0].size == (64, 64)
    assert np.array_equal(np.asarray(r1.images[0]), np.asarray(r2.images[0]))
    assert not np.array_equal(np.asarray(r1.images[0]), np.asarray(r3.images[0]))
    assert mlnb.last_result() is r3
    assert r1.seed == 3 and r1.params["steps"] == 2
    assert defaults.model == str(folder)  # remembered for the next cell


def test_result_holds_no_tensors(ip, tiny_sd):
    run(ip, gen_cell(tiny_sd, "--seed 1 --out r"))
    result = ip.user_ns["r"]
    stack, seen = [result], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        assert not isinstance(obj, torch.Tensor)
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dataclass_fields__"):
            stack.extend(getattr(obj, f) for f in obj.__dataclass_fields__)


def test_model_is_remembered_and_prompt_expands(ip, tiny_sd):
    defaults.model = str(tiny_sd)
    ip.user_ns["animal"] = "otter"
    assert run(ip, "%%generate --steps 2 --width 64 --height 64 --seed 2 --quiet --out r\na {animal} in {{snow}}").error_in_exec is None
    assert ip.user_ns["r"].params["prompt"] == "a otter in {snow}"


def test_displayed_result_is_the_report_line(ip, tiny_sd, capsys):
    capsys.readouterr()
    run(ip, f"%%generate --model {tiny_sd} --steps 2 --width 64 --height 64 --seed 5\na fox")
    out = capsys.readouterr().out
    assert "64×64 · 2 steps ·" in out and "level " in out and "freed" in out
    html = mlnb.last_result()._repr_html_()
    assert html.count("<img") == 1 and "data:image/png;base64," in html


@pytest.mark.parametrize("options,needle", [
    ("--steps -1", "--steps must be a whole number >= 1"),
    ("--steps 0", "--steps must be a whole number >= 1"),
    ("--width 65", "--width must be a positive multiple of 8"),
    ("--level turbo", "unknown level 'turbo'"),
    ("--bogus 1", "unrecognized arguments: --bogus"),
    ("--seed abc", "invalid int value"),
    ("--num-images 0", "--num-images must be between"),
])
def test_bad_options_are_one_line_usage_errors(ip, tiny_sd, capsys, options, needle):
    text = usage_error(ip, f"%%generate --model {tiny_sd} {options}\na fox", capsys)
    assert needle in text


def test_no_model_says_how_to_name_one(ip, capsys):
    defaults.model = None
    assert "--model" in usage_error(ip, "%%generate --steps 2\na fox", capsys)


def test_missing_model_and_pickle_weights(ip, tmp_path, tiny_sd_pickle, capsys):
    assert "no model folder" in usage_error(ip, gen_cell(tmp_path / "nope" / "model"), capsys)
    text = usage_error(ip, gen_cell(tiny_sd_pickle), capsys)
    assert "allow_pickle" in text or "--allow-pickle" in text
    assert run(ip, gen_cell(tiny_sd_pickle, "--allow-pickle --seed 1")).error_in_exec is None


def test_save_writes_and_never_overwrites(ip, tiny_sd, tmp_path, capsys):
    target = tmp_path / "fox.png"
    assert run(ip, gen_cell(tiny_sd, f"--seed 1 --save {target}")).error_in_exec is None
    data = target.read_bytes()
    assert data.startswith(b"\x89PNG")
    usage_error(ip, gen_cell(tiny_sd, f"--seed 2 --save {target}"), capsys)
    assert target.read_bytes() == data
    assert run(ip, gen_cell(tiny_sd, f"--seed 1 --save {tmp_path}")).error_in_exec is None
    assert (tmp_path / "mlnb-1-0.png").exists()


def test_help_lists_the_options(ip):
    doc = ip.find_cell_magic("generate").__doc__
    for option in ("--model", "--level", "--steps", "--guidance", "--seed", "--width", "--height", "--negative",
                   "--num-images", "--out", "--save", "--quiet"):
        assert option in doc


def test_vram_actions_return_text_and_html(ip, tiny_sd):
    run(ip, gen_cell(tiny_sd, "--seed 1"))
    for line in ("", "history", "who", "on", "verbose", "verbose", "level", "level ultra", "free"):
        value = ip.run_line_magic("vram", line)
        assert str(value).strip(), line
        assert value._repr_html_().startswith("<"), line
    assert defaults.setting == MemorySetting.of_level("ultra")
    assert "pipeline" not in str(ip.run_line_magic("vram", "")) or "none loaded" in str(ip.run_line_magic("vram", ""))


def test_vram_status_lists_loaded_pipelines(ip, tiny_sd):
    run(ip, gen_cell(tiny_sd, "--seed 1 --level none"))
    text = str(ip.run_line_magic("vram", ""))
    assert str(tiny_sd) in text and "unet: cpu" in text and "auto level" in text


def test_vram_history_has_a_row_per_cell(ip):
    cell_history.clear()
    run(ip, "x = 1")
    run(ip, "y = 2")
    table = ip.run_line_magic("vram", "history")
    assert len(table.rows) == 2 and table.rows[-1][-1] == "y = 2"


def _loads(monkeypatch) -> list:
    """The memory settings ``load`` is called with (patched where it is defined)."""
    from mlnb.pipeline import loading

    loads = []
    real = loading.load
    monkeypatch.setattr(loading, "load", lambda model, setting, **k: loads.append(setting) or real(model, setting, **k))
    return loads


def test_vram_level_takes_a_budget_too_and_generate_then_plans_for_it(ip, tiny_sd, clean_cache, monkeypatch):
    loads = _loads(monkeypatch)
    notice = ip.run_line_magic("vram", "level 3GiB")
    assert "default budget for %%generate: 3 GiB" in str(notice)
    assert ("default budget", "3 GiB") in ip.run_line_magic("vram", "").rows()
    run(ip, f"%%generate --model {tiny_sd} --steps 1 --width 64 --height 64 --seed 1 --quiet --out r\na fox")
    assert loads[-1] == MemorySetting.of_budget(3 * 2**30)
    result = ip.user_ns["r"]
    assert result.plan is not None and result.plan.budget == 3 * 2**30 and result.setting is loads[-1]
    assert "plan for 3 GiB: " in result.report_line()


@pytest.mark.parametrize("typed, shown, budget", [
    ("3.75GiB", "3.75 GiB", 4_026_531_840),
    ("1500MiB", "1500 MiB", 1_572_864_000),
])
def test_a_budget_typed_with_vram_level_is_shown_as_typed_and_planned_to_the_byte(ip, tiny_sd, clean_cache, capsys,
                                                                                  typed, shown, budget):
    """``%vram level 3.75GiB`` answers with 3.75 GiB (it said 3.8 GiB and planned 51 MiB more); ``1500MiB`` is
    1500 MiB (it became 1.5 GiB): the number and unit as typed, and the plan for exactly those bytes."""
    capsys.readouterr()
    assert run(ip, f"%vram level {typed}").success
    assert f"default budget for %%generate: {shown}" in capsys.readouterr().out
    assert defaults.setting.budget == budget
    assert run(ip, "%vram level").result.text == f"default budget: {shown}"
    assert run(ip, f"%%generate --model {tiny_sd} --steps 1 --width 64 --height 64 --seed 1 --out r\na fox").success
    result = ip.user_ns["r"]
    assert result.plan.budget == budget and str(result.setting) == shown
    assert f"plan for {shown}: " in capsys.readouterr().out  # the report line, and the plan as it loaded
    assert [p.tag for p in mlnb.pipeline.cached_pipelines()] == [f"budget {shown}"]
    assert ("default budget", shown) in ip.run_line_magic("vram", "").rows()


def test_vram_on_generate_is_planned_to_the_byte_and_shown_as_typed(ip, tiny_sd, clean_cache, monkeypatch):
    loads = _loads(monkeypatch)
    run(ip, f"%%generate --model {tiny_sd} --vram 1500MiB --steps 1 --width 64 --height 64 --seed 1 --quiet --out r"
            "\na fox")
    assert loads[-1].budget == 1_572_864_000 and ip.user_ns["r"].plan.budget == 1_572_864_000
    assert "plan for 1500 MiB: " in ip.user_ns["r"].report_line()
    assert defaults.setting.is_auto  # a cell's option is not the session's


def test_vram_bad_input(ip, capsys):
    assert "unknown action" in usage_error(ip, "%vram nope", capsys)
    assert "unknown level" in usage_error(ip, "%vram level turbo", capsys)
    assert "holds no model; give a unit" in usage_error(ip, "%vram level 4", capsys)  # 4 bytes, not 4 GiB
    assert "--outputs goes with %vram free" in usage_error(ip, "%vram who --outputs", capsys)


def test_vram_free_outputs_drops_pinned_entries(ip):
    device = FakeDevice()
    with use_device(device):
        ip.user_ns["fake"] = device
        run(ip, "fake.track(__import__('torch').zeros(1024))")
        n = ip.execution_count - 1
        assert n in ip.user_ns["Out"]
        who = ip.run_line_magic("vram", "who")
        assert any(row[3].startswith(f"Out[{n}]") or row[3] == "_" for row in who.rows)
        report = ip.run_line_magic("vram", "free --outputs")
        assert f"Out[{n}]" in report.outputs_dropped
        assert n not in ip.user_ns["Out"] and f"_{n}" not in ip.user_ns
        assert not ip.run_line_magic("vram", "who").rows
        del ip.user_ns["fake"]


def test_vram_who_names_namespace_holders(ip):
    device = FakeDevice()
    with use_device(device):
        ip.user_ns["holder"] = {"latents": device.track(torch.zeros(4096)), "small": device.track(torch.zeros(8))}
        rows = ip.run_line_magic("vram", "who").rows
        assert rows[0][3] == "holder['latents']" and rows[0][0] == "16.0 KiB"
        assert rows[1][3] == "holder['small']"
        del ip.user_ns["holder"]


def test_the_demo_command_turns_a_bad_option_into_one_line_and_exit_status_2(tmp_path):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "mlnb.cli", "demo", "--steps", "0", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "MLNB_CACHE": str(tmp_path / "cache")},
    )
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("mlnb demo:") or "Traceback" in line]
    assert lines == ["mlnb demo: error: --steps must be a whole number >= 1, got 0"], run.stderr


def test_vram_free_prints_its_own_report_and_no_cell_line_beside_it(ip, capsys):
    """The cell's line would say ``freed 0 B`` under a report that says what %vram free gave back."""
    device = FakeDevice()
    with use_device(device):
        device.allocate(64 * 2**20)
        device.release(64 * 2**20)  # 64 MiB reserved, cached
        capsys.readouterr()
        result = run(ip, "%vram free")
        out = capsys.readouterr().out
    assert result.success and "64.0 MiB" in str(result.result)
    assert "[mlnb] cell" not in out, out


def test_a_generate_cell_checks_its_arguments_once_and_calls_the_session_s_use_case(ip, tiny_sd, monkeypatch):
    """The magic parses, calls the session's generation (the dashboard's Generate calls it too), and displays: the
    arguments are checked once, where the options are read, not again below."""
    from mlnb import session
    from mlnb.pipeline import GenerationArgs

    checks, calls = [], []
    checked = GenerationArgs.checked.__func__
    monkeypatch.setattr(GenerationArgs, "checked",
                        classmethod(lambda cls, *a, **k: checks.append(1) or checked(cls, *a, **k)))
    use_case = session.generate_images
    monkeypatch.setattr(session, "generate_images", lambda *a, **k: calls.append(a) or use_case(*a, **k))
    assert run(ip, gen_cell(tiny_sd, "--seed 1 --out r")).success
    assert checks == [1] and len(calls) == 1 and calls[0][0].prompt == "a watercolor fox"
    assert mlnb.last_result() is ip.user_ns["r"]
