"""What a request and a model folder are checked for before any work, and what the cache hands out, typed as a user
types them in a real IPython shell, from Python, and in the dashboard: a damaged model folder is one line naming the
file; a size, batch, step count or guidance the device or the scheduler cannot run is one line before anything is
allocated; the cache never serves a pipeline for another device, changed weights, or a pipeline no longer whole, and
an unload asked for from inside a generation waits for it. Runs on both stacks (IPython 9 and 7.34)."""

from __future__ import annotations

import html
import shutil

import pytest

import mlnb
from mlnb.errors import ModelLoadError

pytestmark = pytest.mark.usefixtures("fresh_defaults", "clean_cache")

FAST = "--steps 1 --width 64 --height 64 --seed 1"
DAMAGED = "save the pipeline again (pipe.save_pretrained) or download it again"


def run(ip, source: str):
    return ip.run_cell(source, store_history=True)


def one_line(ip, source: str, capsys) -> str:
    """Run a cell that must fail with a UsageError shown as exactly one line, no traceback; return the line."""
    from IPython.core.error import UsageError

    capsys.readouterr()
    result = run(ip, source)
    assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
    captured = capsys.readouterr()
    text = (captured.out + captured.err).strip()
    assert "Traceback" not in text and text.count("\n") == 0 and text.startswith("UsageError: "), text
    return text


@pytest.fixture
def board(fresh_defaults):
    """A dashboard without its updater thread, closed afterwards."""
    pytest.importorskip("ipywidgets")
    made = mlnb.dashboard(start=False)
    yield made
    made.close()


# ----------------------------------------------------------------------------------------------------------------
# A damaged model folder is one line naming the file

_BROKEN = {  # case: (file, bytes written, what the line says of it)
    "index-not-json": ("model_index.json", b"{bad", "is not valid JSON (Expecting property name enclosed in double "
                                                    "quotes: line 1 column 2 (char 1))"),
    "index-not-object": ("model_index.json", b"[1, 2]", "is not a JSON object (it holds an array)"),
    "index-not-utf8": ("model_index.json", b'{"a": "\xff"}', "is not UTF-8 text (byte 0xff at position 7)"),
    "config-not-json": ("unet/config.json", b"{bad", "is not valid JSON (Expecting property name enclosed in double "
                                                     "quotes: line 1 column 2 (char 1))"),
    "config-not-object": ("vae/config.json", b'"text"', "is not a JSON object (it holds a string)"),
    "config-not-utf8": ("text_encoder/config.json", b"\xfe{}", "is not UTF-8 text (byte 0xfe at position 0)"),
    "scheduler-not-json": ("scheduler/scheduler_config.json", b"", "is not valid JSON (Expecting value: line 1 "
                                                                   "column 1 (char 0))"),
}


def _broken_model(tiny_sd, tmp_path, case: str):
    """A copy of the tiny SD pipeline, in a folder whose path has a space, damaged as ``case`` says; returns the
    folder and the line that names what is wrong."""
    folder = tmp_path / "my models" / case
    shutil.copytree(tiny_sd, folder)
    if case == "missing-component":
        shutil.rmtree(folder / "vae")
        return folder, (f"{str(folder / 'vae')!r} is missing: {str(folder / 'model_index.json')!r} names the "
                        f"component 'vae'; {DAMAGED}")
    name, content, says = _BROKEN[case]
    (folder / name).write_bytes(content)
    return folder, f"{str(folder / name)!r} {says}; {DAMAGED}"


CASES = sorted(_BROKEN) + ["missing-component"]


@pytest.mark.parametrize("case", CASES)
def test_a_damaged_model_folder_is_one_line_naming_the_file_in_a_magic(ip, tiny_sd, tmp_path, capsys, case):
    folder, line = _broken_model(tiny_sd, tmp_path, case)
    assert one_line(ip, f"%%generate --model '{folder}' {FAST}\na fox", capsys) == f"UsageError: {line}"
    assert mlnb.pipeline.cached_pipelines() == [] and mlnb.session.defaults.model is None
    assert run(ip, "1 + 1").success  # the next cell runs


@pytest.mark.parametrize("case", CASES)
def test_a_damaged_model_folder_is_one_line_naming_the_file_from_python(tiny_sd, tmp_path, case):
    folder, line = _broken_model(tiny_sd, tmp_path, case)
    with pytest.raises(ModelLoadError) as info:
        mlnb.load_pipeline(folder)
    assert str(info.value) == line and info.value.__cause__ is None


@pytest.mark.parametrize("case", ["index-not-json", "config-not-object", "missing-component"])
def test_a_damaged_model_folder_is_one_line_naming_the_file_in_the_dashboard(board, tiny_sd, tmp_path, case):
    folder, line = _broken_model(tiny_sd, tmp_path, case)
    panel = board.generate_panel
    board.model.value = str(folder)  # typed into the model field
    panel.prompt.value = "a fox"
    panel.steps.value, panel.seed.value, panel.width.value, panel.height.value = 1, "1", "64", "64"
    panel.button.click()
    assert panel.wait(timeout=60)
    assert panel.error == line
    assert html.escape(line) in panel.status.value and not panel.button.disabled


def test_a_component_passed_as_an_object_needs_no_folder(tiny_sd, tmp_path):
    from diffusers import AutoencoderKL

    folder, _ = _broken_model(tiny_sd, tmp_path, "missing-component")
    vae = AutoencoderKL.from_pretrained(tiny_sd / "vae")
    assert mlnb.load_pipeline(folder, level="none", vae=vae).pipe.vae is vae
