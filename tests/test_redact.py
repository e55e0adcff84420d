"""Secrets masked wherever mlnb shows arguments or source text (pure)."""

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


def test_mask_text_hides_secret_assignments_of_any_shape_and_keeps_the_rest():
    assert mask_text('password = "hunter2"  # x') == f'password = "{MASK}"  # x'
    assert mask_text('prompt = "a fox"') == 'prompt = "a fox"'
    assert mask_text("x = 1") == "x = 1"
