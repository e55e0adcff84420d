"""A magic's option line, split and parsed as a shell user types it.

IPython's ``parse_argstring`` splits a line with ``arg_split(..., strict=False)``: the quotes stay in the values
(``--negative "blurry, low quality"`` gives ``'"blurry, low quality"'``), a backslash-escaped space splits, and
the rules differ between IPython releases. Here the line is split with ``shlex.split`` in POSIX mode on every
platform and IPython version: quotes are removed, and quoted or backslash-escaped spaces stay in one value. The
magic's own argparse parser (the one ``@magic_arguments`` builds, which also gives ``%%generate?`` its help) then
reads the words.

argparse takes a word that starts with ``-`` for an option unless it looks like a plain negative number, so
``--guidance -1e3`` or ``--vram -4GiB`` would be "expected one argument". An option that takes a value therefore
gets the next word whatever it starts with, unless that word is one of the magic's own options; and a positional
value that starts with ``-`` is passed after ``--``. The checks on the value then say what is wrong with it.
"""

from __future__ import annotations

import argparse
import re
import shlex

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument

__all__ = ["HelpRequested", "help_argument", "parse_options", "shell_words"]

# A word that is a value, not an option: a negative number or size (-1, -.5, -1e3, -4GiB).
_NEGATIVE_VALUE = re.compile(r"-\.?\d")


class HelpRequested(Exception):
    """``-h``/``--help`` was given; carries the magic's help text."""


class _ShowHelp(argparse.Action):
    """``-h``/``--help``: stop parsing and hand the help text to the magic (argparse's own would exit)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        raise HelpRequested(parser.format_help())


# One decorator for every magic: the help is listed among the options, as in a shell command.
help_argument = argument("-h", "--help", action=_ShowHelp, help="show this help and do nothing else")


def shell_words(line: str, name: str) -> list[str]:
    """Split ``line`` as a POSIX shell does; an unclosed quote or a trailing backslash is one ``UsageError`` line.

    Args:
        line: the option line, after IPython's own ``{var}``/``$var`` expansion.
        name: the magic as the user typed it (``"%%generate"``), for the error.
    """
    try:
        return shlex.split(line, posix=True)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise UsageError(f"{name}: {exc} in the options") from None


def _option(parser: argparse.ArgumentParser, word: str) -> tuple[bool, argparse.Action | None]:
    """Whether ``word`` is one of the parser's options (as argparse would read it), and its action when that is
    known: ``--name``, ``--name=value``, an unambiguous ``--na`` prefix, ``-n`` or ``-n5``."""
    if not word.startswith("-") or word == "-" or word == "--":
        return False, None
    actions = parser._option_string_actions  # argparse's own table of option strings
    key = word.split("=", 1)[0]
    if key in actions:
        return True, actions[key]
    if key.startswith("--"):
        matches = {actions[s] for s in actions if s.startswith(key)} if parser.allow_abbrev else set()
        if len(matches) == 1:
            return True, matches.pop()
        return bool(matches), None  # ambiguous: argparse says so
    return (word[:2] in actions), actions.get(word[:2])


def _argv(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """The words rearranged so argparse reads every value as a value (see the module docstring)."""
    options: list[str] = []
    positionals: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":  # the user's own end of options: the rest are values
            positionals += words[i + 1:]
            break
        known, action = _option(parser, word)
        if known:
            takes_one = action is not None and action.nargs is None and action.option_strings
            has_value = "=" in word or (word[1:2] != "-" and len(word) > 2)
            if takes_one and not has_value and i + 1 < len(words) and not _option(parser, words[i + 1])[0]:
                value = words[i + 1]
                options.append(f"{word}={value}" if word.startswith("--") else f"{word}{value}")
                i += 2
                continue
            options.append(word)
        elif word.startswith("-") and not _NEGATIVE_VALUE.match(word):
            options.append(word)  # an unknown option: argparse names it
        else:
            positionals.append(word)
        i += 1
    if any(w.startswith("-") for w in positionals):
        return options + ["--"] + positionals
    return options + positionals


def parse_options(magic, line: str, name: str) -> argparse.Namespace:
    """Parse a magic's option line as a shell user types it, with the parser ``@magic_arguments`` built.

    Args:
        magic: the decorated magic method (its ``parser`` attribute is used).
        line: the option line, after IPython's expansion of ``{var}`` and ``$var``.
        name: the magic as typed (``"%%generate"``, ``"%vram"``), for errors.

    Raises:
        UsageError: an unclosed quote, or what argparse refused (one line each).
        HelpRequested: ``-h``/``--help`` was given; its text is the help.
    """
    parser = magic.parser
    return parser.parse_args(_argv(parser, shell_words(line, name)))
