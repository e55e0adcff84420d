"""A session without a GPU gets useful answers: ``%vram who`` lists the largest host tensors, ``%vram free
--outputs`` drops the outputs that pin large host tensors, and a budget says in one line that its plan is not
applied. Typed as a user types them, in the real shell, on the CPU device the tests run on."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("fresh_defaults", "fresh_outputs")


def run(ip, source: str):
    return ip.run_cell(source, store_history=True)


def test_vram_who_without_a_gpu_lists_the_largest_host_tensors(ip):
    run(ip, "import torch\nbig = torch.zeros(8, 1024, 1024)")
    shown = run(ip, "torch.ones(4, 1024, 1024)").execution_count
    table = run(ip, "%vram who").result
    assert table.title == "no GPU: largest host tensors reachable from the notebook"
    assert table.rows[0][:4] == ("32.0 MiB", "float32", "8×1024×1024", "big")
    assert ("16.0 MiB", "float32", "4×1024×1024", f"Out[{shown}]") in table.rows
    del ip.user_ns["big"]


def test_vram_free_outputs_without_a_gpu_drops_outputs_that_pin_large_host_tensors(ip):
    run(ip, "import torch\nbig = torch.zeros(8, 1024, 1024)")
    own = run(ip, "big").execution_count  # the user's variable, shown: only IPython's reference goes
    large = run(ip, "torch.ones(4, 1024, 1024)").execution_count
    small = run(ip, "torch.ones(4)").execution_count
    report = run(ip, "%vram free --outputs").result
    assert set(report.outputs_dropped) == {f"Out[{own}]", f"Out[{large}]"}
    assert small in ip.user_ns["Out"] and own not in ip.user_ns["Out"] and large not in ip.user_ns["Out"]
    assert f"_{large}" not in ip.user_ns
    assert ip.user_ns["big"].shape == (8, 1024, 1024)  # never the user's own variables
    assert "pinning large host tensors" in str(report)
    del ip.user_ns["big"]


NOT_APPLIED = "(shown, not applied: no GPU, the pipeline runs on the CPU)"


def _said(capsys, caplog) -> list[str]:
    """What a cell printed, and mlnb's warnings (a kernel writes them to stderr; pytest's handler takes them here)."""
    printed = "".join(capsys.readouterr())
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("mlnb") and r.levelno >= 30]
    caplog.clear()
    return [line for line in printed.splitlines() if line.strip()] + warned


def test_a_budget_without_a_gpu_says_in_one_line_that_its_plan_is_not_applied(ip, tiny_sd, clean_cache, capsys,
                                                                              caplog):
    capsys.readouterr()
    caplog.clear()
    cell = f"%%generate --model {tiny_sd} --vram 2GiB --steps 1 --width 64 --height 64 --seed 1 --quiet --out r\na fox"
    assert run(ip, cell).success
    assert _said(capsys, caplog) == [f"plan for 2 GiB: resident {NOT_APPLIED}"]
    report = ip.user_ns["r"].report_line()
    assert f"plan for 2 GiB: resident {NOT_APPLIED}" in report
    assert "predicted" not in report and "measured" not in report and "N/A" not in report
    ip.user_ns["folder"] = str(tiny_sd)
    run(ip, "%vram free")  # the next load is not announced as replacing this one
    _said(capsys, caplog)
    assert run(ip, "import mlnb\npipe = mlnb.load_pipeline(folder, budget='3GiB')").success
    assert _said(capsys, caplog) == [f"plan for 3 GiB: resident {NOT_APPLIED}"]
    for name in ("r", "pipe", "folder"):
        ip.user_ns.pop(name, None)
