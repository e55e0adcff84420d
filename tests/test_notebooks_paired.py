"""Each tutorial's jupytext ``py:percent`` source and its ``.ipynb`` hold the same cells.

The ``.py`` is the file to edit; the ``.ipynb`` is what Colab opens and what nbval executes. Editing one without
syncing the other (``python notebooks/nbtools.py execute NAME``) fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PAIRED = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def _cells(nb) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", ()))) for c in nb.cells]


def test_there_are_notebooks():
    assert len(PAIRED) >= 5, f"expected the tutorial notebooks in {NOTEBOOKS}"


def test_every_ipynb_has_its_py():
    unpaired = [p.name for p in NOTEBOOKS.glob("*.ipynb") if not p.with_suffix(".py").exists()]
    assert not unpaired, f"notebooks without a py:percent source: {unpaired}"


@pytest.mark.parametrize("py", PAIRED, ids=[p.stem for p in PAIRED])
def test_py_and_ipynb_hold_the_same_cells(py: Path):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing: run python notebooks/nbtools.py execute {py.stem}"
    text = jupytext.read(py)
    assert text.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", f"{py.name} is not paired"
    stored = nbformat.read(ipynb, as_version=4)
    want, have = _cells(text), _cells(stored)
    for i, (a, b) in enumerate(zip(want, have)):
        assert a == b, (
            f"{py.stem}: cell {i} differs between the .py and the .ipynb "
            f"(run python notebooks/nbtools.py execute {py.stem}):\n.py:    {a!r}\n.ipynb: {b!r}"
        )
    assert len(want) == len(have), f"{py.stem}: {len(want)} cells in the .py, {len(have)} in the .ipynb"


@pytest.mark.parametrize("py", PAIRED, ids=[p.stem for p in PAIRED])
def test_ipynb_was_executed(py: Path):
    """nbval compares against stored outputs: every code cell must have been run, in order."""
    stored = nbformat.read(py.with_suffix(".ipynb"), as_version=4)
    counts = [c.execution_count for c in stored.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), f"{py.stem}: execution counts {counts}; rerun nbtools.py execute"
