"""docs/api.md is generated from the public names' signatures and docstrings: it cannot drift from the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "api_reference.py"


def _generator():
    spec = importlib.util.spec_from_file_location("api_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_api_reference_is_what_the_code_says():
    generator = _generator()
    written = generator.TARGET.read_text(encoding="utf-8")
    assert written == generator.render(), "docs/api.md differs from the code: run python scripts/api_reference.py"


def test_every_public_name_of_mlnb_is_in_the_reference():
    import mlnb

    listed = {name for _, names in _generator().SECTIONS for name in names}
    missing = sorted(f"mlnb.{name}" for name in mlnb._LAZY if f"mlnb.{name}" not in listed)
    assert missing == [], f"public names without a section in scripts/api_reference.py: {missing}"


def test_a_changed_docstring_shows_as_a_difference(monkeypatch):
    import mlnb.levels

    generator = _generator()
    before = generator.render()
    monkeypatch.setattr(mlnb.levels.choose_level, "__doc__", "Something else entirely.")
    assert generator.render() != before
