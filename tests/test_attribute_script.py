"""``scripts/attribute_step.py --tiny``: every section of the streamed step's attribution runs on the CPU with finite
numbers, the plan it applies really streams units through the ring, and the streamed forward computes what the
resident one does."""

from __future__ import annotations

import gzip
import json
import math
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
SECTIONS = ("R_resident", "B_plan", "C_copy_only", "U_streamed_uncapped", "K_streamed_capped", "T_trace", "X_cleanup")
# numbers each section must have on the CPU (the CUDA-only ones, such as the graph replay, are left out there)
REQUIRED = {
    "R_resident": ("gpu_step_ms", "host_issue_ms"),
    "B_plan": ("replay_ms", "copies_ms_at_probe", "streamed_mib", "units"),
    "C_copy_only": ("gbps", "packed_mib", "copied_per_step_mib", "ms_per_step"),
    "U_streamed_uncapped": ("gpu_step_ms", "host_issue_ms", "hook_host_ms_per_step", "max_abs_diff"),
    "K_streamed_capped": ("gpu_step_ms", "host_issue_ms", "hook_host_ms_per_step", "max_abs_diff"),
    "X_cleanup": ("gc_collect_s", "empty_cache_s", "regrow_s"),
}


def _numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One ``--tiny`` run, in this process: its JSON and its printed table."""
    folder = tmp_path_factory.mktemp("attribute")
    sys.path.insert(0, str(SCRIPTS))
    try:
        import attribute_step

        printed = StringIO()
        with redirect_stdout(printed):
            assert attribute_step.main(["--tiny", "--json", str(folder / "out.json"), "--trace-dir", str(folder)]) == 0
    finally:
        sys.path.remove(str(SCRIPTS))
        sys.modules.pop("attribute_step", None)
        sys.modules.pop("provenance", None)
    return json.loads((folder / "out.json").read_text()), printed.getvalue(), folder


def test_every_section_has_finite_numbers(tiny_run):
    doc, printed, _ = tiny_run
    assert "error" not in doc
    for section in SECTIONS:
        assert section in doc, section
        assert all(math.isfinite(v) for v in _numbers(doc[section])), (section, doc[section])
    for section, keys in REQUIRED.items():
        for key in keys:
            value = doc[section][key]
            assert isinstance(value, (int, float)) and math.isfinite(value), (section, key, value)
    for label in ("R resident", "B plan", "C copy only", "U streamed", "K capped", "T trace", "X cleanup"):
        assert label in printed
    assert {"machine", "versions", "date", "command"} <= set(doc)


def test_the_plan_streams_through_the_ring_and_computes_the_same(tiny_run):
    doc, _, _ = tiny_run
    plan, streamed, copied = doc["B_plan"], doc["U_streamed_uncapped"], doc["C_copy_only"]
    assert plan["units"] > 1
    assert streamed["chained"] and streamed["units"] == plan["units"]  # the order was recorded: the ring is used
    assert streamed["hook_calls_per_step"] >= 2 * streamed["units"]  # every unit entered and left at every step
    assert copied["copied_per_step_mib"] > 0  # units share the ring's bytes: copied again at every step
    scale = max(1.0, streamed["reference_max_abs"])
    assert streamed["max_abs_diff"] <= 1e-5 * scale
    assert doc["K_streamed_capped"]["max_abs_diff"] <= 1e-5 * scale


def test_sdxl_plan_and_trace(tiny_run):
    doc, _, folder = tiny_run
    assert doc["B_plan"]["sdxl_plan"].startswith("plan for 4.0 GiB: stream")  # SDXL's shapes, planned on meta
    trace = Path(doc["T_trace"]["trace"])
    assert trace.parent == folder
    with gzip.open(trace, "rt") as fh:
        assert json.load(fh)["traceEvents"]
