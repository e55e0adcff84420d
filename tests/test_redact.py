"""Secrets masked wherever mlnb shows arguments or source text: the pure rules, then the per-cell history as
``%vram history`` and the dashboard show it, typed in the real shell."""

from __future__ import annotations

import pytest

from mlnb.redact import MASK, is_secret_name, mask_text, masked_kwargs

TOKEN = "hf_" + "aB3" * 12


@pytest.mark.parametrize("name", ["token", "hf_token", "HF_TOKEN", "use_auth_token", "api_key", "OPENAI_API_KEY",
                                  "password", "os_token", "secret", "apikey", "access_key"])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["model", "variant", "revision", "model_key", "keyframes", "monkey", "tokenizer",
                                  "prompt", "steps"])
def test_plain_names(name):
    assert not is_secret_name(name)


def test_masked_kwargs_hides_secret_names_and_token_values():
    shown = masked_kwargs({"token": "anything", "variant": "fp16", "revision": TOKEN, "cache_dir": None})
    assert shown == {"token": MASK, "variant": "fp16", "revision": MASK, "cache_dir": None}
    assert TOKEN not in repr(shown)


@pytest.mark.parametrize("source", [
    f'os_token = "{TOKEN}"',
    f"HF_TOKEN='{TOKEN}'",
    f'pipe = mlnb.load_pipeline("m", token="{TOKEN}")',
    f"login({TOKEN!r})",
    f"os.environ['X'] = '{TOKEN}'",
])
def test_mask_text_hides_tokens(source):
    masked = mask_text(source)
    assert TOKEN not in masked and MASK in masked


@pytest.mark.parametrize("source,masked", [
    ('os.environ["HF_TOKEN"] = "hunter2"', 'os.environ["HF_TOKEN"] = "***"'),
    ("os.environ.setdefault('HF_TOKEN', 'hunter2')", "os.environ.setdefault('HF_TOKEN', '***')"),
    ('config = {"token": "hunter2", "model": "m"}', 'config = {"token": "***", "model": "m"}'),
    ("%env HF_TOKEN=hunter2", "%env HF_TOKEN=***"),
    ("%set_env OPENAI_API_KEY hunter2", "%set_env OPENAI_API_KEY ***"),
    ("!export HF_TOKEN=hunter2", "!export HF_TOKEN=***"),
    ('token = r"hunter2"', 'token = r"***"'),
    ('print(token, "a fox")', 'print(token, "a fox")'),
    ("%env MLNB_MODEL=/content/models/sd", "%env MLNB_MODEL=/content/models/sd"),
])
def test_mask_text_hides_secrets_set_through_the_environment_and_quoted_keys(source, masked):
    assert mask_text(source) == masked


def test_mask_text_hides_secret_assignments_of_any_shape_and_keeps_the_rest():
    assert mask_text('password = "hunter2"  # x') == f'password = "{MASK}"  # x'
    assert mask_text('prompt = "a fox"') == 'prompt = "a fox"'
    assert mask_text("x = 1") == "x = 1"


def test_a_secret_typed_in_a_cell_reaches_neither_vram_history_nor_the_dashboard(ip, monkeypatch):
    from mlnb.monitor import cell_history
    from mlnb.widgets.state import history_table_html

    monkeypatch.setenv("HF_TOKEN", "")  # %env below sets it: put back after the test
    cells = [
        f'os_token = "{TOKEN}"',
        'import os\nos.environ["HF_TOKEN"] = "hunter2-secret"',
        "%env HF_TOKEN=hunter2-secret",
        f'prompt = "a watercolor fox in a snowy forest"; hf = "{TOKEN}"',  # the token straddles the cut at 60
    ]
    cell_history.clear()
    for cell in cells:
        ip.run_cell(cell, store_history=True)
    table = ip.run_line_magic("vram", "history")
    shown = str(table) + table._repr_html_() + history_table_html(cell_history.records(), last=10)
    assert 'os_token = "***"' in shown and "%env HF_TOKEN=***" in shown
    assert "hunter2" not in shown and TOKEN[:10] not in shown, shown
    assert all(TOKEN not in r.source and "hunter2" not in r.source for r in cell_history.records())
    for name in ("os_token", "prompt", "hf"):
        ip.user_ns.pop(name, None)
