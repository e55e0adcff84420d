"""Masking secrets wherever mlnb shows what a user typed or passed: keyword arguments and source text (pure).

A hub token given as ``token="hf_..."`` must not reach a warning, a log record, a report or the per-cell history.
Two rules catch it: an argument or variable whose *name* says it is a secret (``token``, ``api_key``,
``HF_TOKEN``, ``password``...), and a *value* shaped like a known token (``hf_`` followed by 30 or more letters and
digits), whatever its name.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

__all__ = ["MASK", "is_secret_name", "mask_value", "masked_kwargs", "mask_text"]

MASK = "***"

# Names that hold secrets: whole words of a snake_case or UPPER_CASE name, e.g. token, hf_token, use_auth_token,
# api_key, OPENAI_API_KEY, secret, password, passwd, credentials (not model_key).
_SECRET_WORDS = re.compile(r"(?i)(?:^|_)(tokens?|secrets?|password|passwd|credentials?|auth|(?:api|secret|access|private)_?key)(?:_|$)")
# Values that are secrets by their shape, wherever they appear.
_TOKEN_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_\-]{20,}|gh[pousr]_[A-Za-z0-9]{30,})\b")
# A quoted value given to a name in source text: `name = "value"`, `name="value"`, `name: "value"`, a quoted key
# (`{"token": "value"}`, `os.environ["HF_TOKEN"] = "value"`) or a quoted name and value as two arguments
# (`os.environ.setdefault("HF_TOKEN", "value")`). The value is masked when the name says it is a secret.
_ASSIGNED = re.compile(
    r"""(?P<kq>['"]?)(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P=kq)(?P<op>\s*\]?\s*(?:=|:|,)\s*)"""
    r"""(?P<p>[rbufRBUF]{0,2})(?P<q>['"])(?P<value>[^'"\n]*)(?P=q)"""
)
# An environment variable set by a magic or a shell line: `%env HF_TOKEN=value`, `%set_env HF_TOKEN value`,
# `!export HF_TOKEN=value`.
_ENV_LINE = re.compile(
    r"""(?m)^(?P<head>[ \t]*(?:%env|%set_env|!?[ \t]*export)[ \t]+)(?P<name>[A-Za-z_][A-Za-z0-9_]*)"""
    r"""(?P<op>[ \t]*=[ \t]*|[ \t]+)(?P<value>\S[^\n]*)"""
)


def is_secret_name(name: str) -> bool:
    """Whether an argument or variable called ``name`` holds a secret (``token``, ``hf_token``, ``api_key``...)."""
    return bool(_SECRET_WORDS.search(str(name)))


def mask_value(name: str, value: Any) -> Any:
    """``value``, or :data:`MASK` when ``name`` says it is a secret (``None`` and ``False`` stay: nothing to hide)."""
    if value is None or value is False:
        return value
    if is_secret_name(name):
        return MASK
    if isinstance(value, str) and _TOKEN_VALUE.search(value):
        return _TOKEN_VALUE.sub(MASK, value)
    return value


def masked_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``kwargs`` safe to show: secret values replaced by :data:`MASK`.

    Example:
        ```python
        >>> masked_kwargs({"token": "hf_abc", "variant": "fp16"})
        {'token': '***', 'variant': 'fp16'}
        ```
    """
    return {name: mask_value(name, value) for name, value in kwargs.items()}


def mask_text(text: str) -> str:
    """``text`` (a cell's source, a message) with secrets masked: quoted values assigned to a secret-named variable
    or keyword, and token-shaped values anywhere.

    Example:
        ```python
        >>> mask_text('os_token = "hf_abc"')
        'os_token = "***"'
        ```
    """

    def assigned(match: re.Match) -> str:
        quoted_pair = "," in match["op"]
        if not is_secret_name(match["name"]) or not match["value"] or (quoted_pair and not match["kq"]):
            return match[0]  # `f(token, "x")`: the string is another argument, not the variable's value
        return f"{match['kq']}{match['name']}{match['kq']}{match['op']}{match['p']}{match['q']}{MASK}{match['q']}"

    def env(match: re.Match) -> str:
        if not is_secret_name(match["name"]):
            return match[0]
        return f"{match['head']}{match['name']}{match['op']}{MASK}"

    return _TOKEN_VALUE.sub(MASK, _ENV_LINE.sub(env, _ASSIGNED.sub(assigned, text)))
