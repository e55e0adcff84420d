"""The libraries' notices in a cell: at most one mlnb line where diffusers and transformers would print several,
and their full text still there for whoever sets the library's logger to DEBUG."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest

CLIP_LOGGER = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"
TRUNCATED = (
    "The following part of your input was truncated because CLIP can only handle sequences up to 77 tokens: "
    "['all pine trees in the fog, a wooden cabin with smoke rising from the chimney']"
)
LONG_PROMPT = "a " * 75 + "all pine trees in the fog"  # 75 one-token words, then what CLIP drops


def test_the_truncation_line_names_the_limit_and_the_start_of_what_was_dropped():
    from mlnb.notices import truncation_line

    assert truncation_line(TRUNCATED) == (
        'prompt truncated to 77 tokens (dropped: "all pine trees in the fog, a wooden cabi…")'
    )
    assert truncation_line("Token indices sequence length is longer than the specified maximum") is None


@pytest.fixture
def library_logger(monkeypatch):
    """diffusers' logging as the library sets it up: its own stderr-like handler, no propagation."""
    root = logging.getLogger("diffusers")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "propagate", False)
    from mlnb.notices import install

    level = root.level
    root.setLevel(logging.WARNING)
    install()
    yield stream
    root.setLevel(level)


def test_the_two_encoders_warnings_become_one_mlnb_line(library_logger, caplog):
    from mlnb.notices import truncation_line

    with caplog.at_level(logging.WARNING, logger="mlnb"):
        logging.getLogger(CLIP_LOGGER).warning(TRUNCATED)
        logging.getLogger("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl").warning(TRUNCATED)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("mlnb")] == [truncation_line(TRUNCATED)]
    assert library_logger.getvalue() == ""


def test_the_full_library_text_shows_at_debug_on_the_library_s_logger(library_logger):
    logging.getLogger("diffusers").setLevel(logging.DEBUG)
    logging.getLogger(CLIP_LOGGER).warning(TRUNCATED)
    logging.getLogger(CLIP_LOGGER).warning("an unrelated warning stays a warning")
    assert library_logger.getvalue().splitlines() == [f"DEBUG {TRUNCATED}", "WARNING an unrelated warning stays a warning"]


# A fresh kernel (the notices come once a process), typed as a user types it; each cell's output between markers.
_SESSION = r'''
import sys
from IPython.testing.globalipapp import start_ipython

ip = start_ipython()
sd, sdxl, prompt = sys.argv[1:4]
cells = [
    "%load_ext mlnb",
    f"%%generate --model {sd} --steps 1 --width 64 --height 64 --seed 1 --quiet\n{prompt}",
    f"%%generate --model {sdxl} --steps 1 --width 64 --height 64 --seed 1 --quiet\n{prompt}",
    "%%generate --model someorg/some-model --steps 1 --quiet\na fox",
    "import logging\nlogging.getLogger('diffusers').setLevel(logging.DEBUG)",
    f"%%generate --model {sd} --steps 1 --width 64 --height 64 --seed 2 --quiet\n{prompt}",
]
for cell in cells:
    print("@@cell", flush=True)
    ip.run_cell(cell, store_history=True)
    sys.stdout.flush()
    sys.stderr.flush()
print("@@cell", flush=True)
'''


def test_a_fresh_session_prints_one_mlnb_line_per_cell_for_the_libraries_notices(tiny_sd, tiny_sdxl, tmp_path):
    """The first load (torchvision missing), a long prompt (CLIP's two warnings, one ~600 characters), SDXL's two
    encoders, and a hub id without network (two hub lines before mlnb's error)."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
           "MLNB_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, "-u", "-c", _SESSION, str(tiny_sd), str(tiny_sdxl), LONG_PROMPT],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, env=env,
    )
    cells = [[line for line in chunk.splitlines() if line.strip()] for chunk in run.stdout.split("@@cell")[1:-1]]
    assert len(cells) == 6, run.stdout
    truncated = 'prompt truncated to 77 tokens (dropped: "all pine trees in the fog")'
    assert cells[0][0].startswith("mlnb ") and len(cells[0]) == 1, cells[0]
    assert cells[1] == [truncated], cells[1]
    assert cells[2] == [truncated], cells[2]
    assert len(cells[3]) == 1 and cells[3][0].startswith("UsageError: cannot reach the Hugging Face Hub"), cells[3]
    assert cells[4] == []
    debug = "\n".join(cells[5])
    assert "The following part of your input was truncated because CLIP" in debug and truncated in debug, cells[5]
