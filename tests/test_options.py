"""A magic's option line split and parsed as a POSIX shell reads it, with the magics' own parsers (no shell)."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError

from mlnb.ipython.magics import MlnbMagics
from mlnb.ipython.options import HelpRequested, parse_options

generate = MlnbMagics.generate
vram = MlnbMagics.vram


@pytest.mark.parametrize("line,field,value", [
    ('--negative "blurry, low quality"', "negative", "blurry, low quality"),
    ("--negative 'blurry, low quality'", "negative", "blurry, low quality"),
    ("--negative blurry,\\ low\\ quality", "negative", "blurry, low quality"),
    ('--negative "a \\"quoted\\" word"', "negative", 'a "quoted" word'),
    ("--negative \"it's\"", "negative", "it's"),
    ('--model "/content/my models/sd"', "model", "/content/my models/sd"),
    ("--model=/content/my\\ models/sd", "model", "/content/my models/sd"),
    ('--save "out dir/x.png"', "save", "out dir/x.png"),
    ("--neg 'abbreviated option'", "negative", "abbreviated option"),
    ("--guidance -1", "guidance", -1.0),
    ("--guidance -1e3", "guidance", -1000.0),
    ("--guidance=-2.5", "guidance", -2.5),
    ("--vram -4GiB", "vram", "-4GiB"),
    ("--negative -blurry", "negative", "-blurry"),
    ('--negative ""', "negative", ""),
])
def test_generate_options_are_read_as_a_shell_reads_them(line, field, value):
    assert getattr(parse_options(generate, line, "%%generate"), field) == value


@pytest.mark.parametrize("line,expected", [
    ("", ("status", None, 10, False)),
    ("level -4GiB", ("level", "-4GiB", 10, False)),
    ("level '4 GiB'", ("level", "4 GiB", 10, False)),
    ("who -n -2", ("who", None, -2, False)),
    ("who --top=-2", ("who", None, -2, False)),
    ("history -n5", ("history", None, 5, False)),
    ("free --outputs", ("free", None, 10, True)),
    ("-n 3 -- level -x", ("level", "-x", 3, False)),
])
def test_vram_options_and_positionals(line, expected):
    args = parse_options(vram, line, "%vram")
    assert (args.action, args.name, args.top, args.outputs) == expected


@pytest.mark.parametrize("line,message", [
    ('--negative "blurry', "%%generate: No closing quotation in the options"),
    ("--negative blurry\\", "%%generate: No escaped character in the options"),
    ("--model --steps 3", "argument --model: expected one argument"),
    ("--model", "argument --model: expected one argument"),
    ("--sampler euler", "unrecognized arguments: --sampler euler"),
    ("--steps 2 -x", "unrecognized arguments: -x"),
    ("--n 2", "ambiguous option: --n could match"),
])
def test_mistakes_are_one_usage_error_line(line, message):
    with pytest.raises(UsageError) as info:
        parse_options(generate, line, "%%generate")
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_help_is_the_magics_usage():
    for line in ("--help", "-h", "--steps 3 --help"):
        with pytest.raises(HelpRequested) as info:
            parse_options(generate, line, "%%generate")
        assert str(info.value).startswith("::\n\n  %%generate [-h] [--model MODEL]")
    with pytest.raises(HelpRequested, match=r"%vram \[-h\]"):
        parse_options(vram, "who --help", "%vram")
