"""Keep the tutorial notebooks in sync and executed.

Each tutorial is a jupytext ``py:percent`` file (``NN_name.py``, the one to edit) paired with ``NN_name.ipynb``
(what Colab opens and what nbval checks: its stored outputs are the reference). After editing a ``.py``::

    python notebooks/nbtools.py execute              # every notebook: run the .py, store the .ipynb with outputs
    python notebooks/nbtools.py execute 03_leak_free_notebooks

It also rewrites the ``.py`` in jupytext's own form (magics commented, as ``jupytext --sync`` writes it). Notebooks
run here as under ``python -m pytest`` (see ``conftest.py``): in a kernel of this Python, in ``notebooks/``, cells
sent with ``store_history=True`` as Jupyter sends them, with :data:`KERNEL_ENV` applied. A cell must raise exactly
when it is tagged ``raises-exception``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The environment every notebook kernel gets, here and under nbval, so the stored outputs are reproducible:
# - MLNB_DEVICE=cpu: the checked path is the CPU one, also on a machine with a GPU (the notebooks then show the
#   simulated card of notebook 03 and the visible "skipped: needs a CUDA GPU" lines of notebook 05);
# - MLNB_MODEL unset: the embedded tiny model, built once per $MLNB_CACHE folder, so nothing is downloaded;
# - TRANSFORMERS_VERBOSITY=error: transformers' advisory warnings on stderr (e.g. about torchvision, which the
#   test environments lack) differ between transformers releases and are not what the notebooks teach.
KERNEL_ENV: dict[str, str | None] = {
    "MLNB_DEVICE": "cpu",
    "MLNB_MODEL": None,
    "TRANSFORMERS_VERBOSITY": "error",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # ipykernel's debugger otherwise warns about frozen modules on stderr
}


def notebooks() -> list[Path]:
    """The paired tutorials' ``.py`` files, in order."""
    return sorted(HERE.glob("[0-9][0-9]_*.py"))


@contextmanager
def kernel_env():
    """Apply :data:`KERNEL_ENV` to ``os.environ`` (which a kernel started inside inherits), then restore it."""
    saved = {key: os.environ.get(key) for key in KERNEL_ENV}
    try:
        _set_env(KERNEL_ENV)
        yield
    finally:
        _set_env(saved)


def _set_env(values: dict[str, str | None]) -> None:
    """Set each variable, or remove it where the value is ``None``."""
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _run_cell(client, cell, timeout: int) -> None:
    """Execute one code cell and store its outputs as Jupyter does (consecutive stream text merged)."""
    from nbformat.v4 import output_from_msg

    outputs: list = []

    def on_output(msg) -> None:
        kind = msg["msg_type"]
        if kind == "clear_output":
            outputs.clear()
        elif kind in ("stream", "display_data", "execute_result", "error"):
            out = output_from_msg(msg)
            if kind == "stream" and outputs and outputs[-1].get("name") == out.name:
                outputs[-1].text += out.text
            else:
                outputs.append(out)

    reply = client.execute_interactive(
        cell.source, output_hook=on_output, timeout=timeout, allow_stdin=False, stop_on_error=False
    )
    cell.outputs = outputs
    cell.execution_count = reply["content"].get("execution_count")
    failed = reply["content"]["status"] != "ok"
    expected = "raises-exception" in cell.metadata.get("tags", [])
    if failed != expected:
        what = "raised" if failed else "did not raise"
        text = "".join(o.get("text", "") for o in outputs) + "\n".join(reply["content"].get("traceback", []))
        raise RuntimeError(f"cell {cell.execution_count} {what} (tags: {cell.metadata.get('tags', [])}):\n{text}")


def execute(py: Path, timeout: int = 300) -> float:
    """Read ``py`` with jupytext, run it in a kernel of this Python, write the paired ``.ipynb`` with outputs."""
    import jupytext
    from jupyter_client import KernelManager
    from nbval.kernel import CURRENT_ENV_KERNEL_NAME, NbvalKernelspecManager

    nb = jupytext.read(py)
    start = time.perf_counter()
    with kernel_env():
        km = KernelManager(kernel_name=CURRENT_ENV_KERNEL_NAME, kernel_spec_manager=NbvalKernelspecManager())
        km.start_kernel(cwd=str(HERE))
    try:
        client = km.client()
        client.start_channels()
        client.wait_for_ready(timeout=120)
        for cell in nb.cells:
            if cell.cell_type == "code":
                _run_cell(client, cell, timeout)
        client.stop_channels()
    finally:
        km.shutdown_kernel(now=True)
    seconds = time.perf_counter() - start
    jupytext.write(nb, py.with_suffix(".ipynb"))
    jupytext.write(nb, py, fmt="py:percent")  # the .py in jupytext's own form (magics commented), as --sync would
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("execute", help="run each .py and store it, with its outputs, as the paired .ipynb")
    run.add_argument("names", nargs="*", help="notebook names (default: all), e.g. 01_quickstart")
    args = parser.parse_args(argv)
    chosen = notebooks()
    if args.names:
        wanted = {Path(n).stem for n in args.names}
        chosen = [p for p in chosen if p.stem in wanted]
        missing = wanted - {p.stem for p in chosen}
        if missing:
            parser.error(f"no such notebook: {', '.join(sorted(missing))}")
    for py in chosen:
        print(f"{py.stem}: {execute(py):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
