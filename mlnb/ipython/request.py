"""Turning ``%%generate`` options and a cell body into a checked generation request (pure, no torch)."""

from __future__ import annotations

import builtins
import keyword
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgumentError
from ..pipeline.loras import LoraSpec, parse_loras
from ..pipeline.saving import check_targets, save_paths
from ..pipeline.validation import GenerationArgs
from ..setting import MemorySetting

__all__ = ["GenerateRequest", "RequestError", "build_request", "expand_prompt"]


_DEFAULT_STEPS = 30


class RequestError(ValueError):
    """A user mistake in the magic's options or prompt; the UI turns it into a one-line ``UsageError``."""


@dataclass(frozen=True)
class GenerateRequest:
    """A checked ``%%generate`` cell: what to generate, and the model and memory setting when the options name them
    (None: the session's, which the generation use case resolves). ``loras`` are the cell's ``--lora`` options: the
    pipeline generates with exactly these, and with none when the cell names none."""

    model: str | None
    setting: MemorySetting | None
    args: GenerationArgs
    out: str | None
    save: str | None
    quiet: bool
    allow_pickle: bool
    loras: tuple[LoraSpec, ...] = ()


# {name}, {name.attr}, {name[key]}, chained: str.format's field syntax without its format spec and conversions.
_FIELD = re.compile(r"(?!\d)\w+(?:\.\w+|\[[^\[\]]*\])*")
_STEP = re.compile(r"\.(\w+)|\[([^\[\]]*)\]")


def _field_text(field: str, conversion: str | None, spec: str) -> str:
    return "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"


def _lookup(field: str, user_ns: dict, what: str):
    """The value ``field`` names: a namespace variable, then its attributes and items, as ``str.format`` reads them."""
    name = re.match(r"\w+", field).group()
    if name not in user_ns:
        raise RequestError(f"{{{field}}} in {what} names no variable in the notebook (write {{{{ for a literal brace)")
    value = user_ns[name]
    for attr, key in _STEP.findall(field[len(name):]):
        if attr.startswith("_"):
            raise RequestError(f"{what} has {{{field}}}: attributes that start with _ are not expanded")
        try:
            value = getattr(value, attr) if attr else value[int(key) if key.isdigit() else key]
        except Exception as exc:  # a missing attribute or index, or a property that raises
            raise RequestError(f"cannot expand {what}: {type(exc).__name__}: {exc}") from None
    return value


def expand_prompt(text: str, user_ns: dict, what: str = "the prompt") -> str:
    """Expand ``{var}`` (and ``{var.attr}``, ``{var[0]}``) from the namespace, once; ``{{``/``}}`` are literal braces.

    What a variable holds is inserted as it is: braces in it are not expanded again. A format spec (``{var:>9}``)
    is refused, so no field can build a string larger than the value itself; ``{var!r}`` and ``{var!s}`` work.

    Args:
        text: the cell body.
        user_ns: the notebook namespace.
        what: the text's name in errors (``"the prompt"``).

    Raises:
        RequestError: one line naming the field and the rule.
    """
    try:
        # Parse first so an unmatched brace is reported as such, not as a missing name.
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise RequestError(f"{what} has a stray brace ({exc}); write {{{{ or }}}} for a literal brace") from None
    pieces = []
    for literal, field, spec, conversion in parts:
        pieces.append(literal)
        if field is None:
            continue
        shown = _field_text(field, conversion, spec)
        if not _FIELD.fullmatch(field):
            raise RequestError(
                f"{what} has {shown}: name a notebook variable inside the braces, or write {{{{ and }}}} for braces"
            )
        if spec:
            raise RequestError(
                f"{what} has {shown}: a format spec is not applied; write {{{field}}}, or {{{{ and }}}} for braces"
            )
        if conversion not in (None, "r", "s"):
            raise RequestError(f"{what} has {shown}: only {{{field}!r}} and {{{field}!s}} convert a value")
        value = _lookup(field, user_ns, what)
        try:
            pieces.append(repr(value) if conversion == "r" else format(value, ""))
        except Exception as exc:  # the value's own __format__/__str__/__repr__ raises
            raise RequestError(f"cannot expand {what}: {type(exc).__name__}: {exc}") from None
    return "".join(pieces)


# IPython's own names in the namespace: its output cache and history (also _N and _iN), the shell, the exits.
_IPYTHON_NAMES = frozenset({"In", "Out", "_ih", "_oh", "_dh", "_i", "_ii", "_iii", "_", "__", "___",
                            "get_ipython", "exit", "quit"})
_IPYTHON_NUMBERED = re.compile(r"_i?\d")


def _check_out(name: str) -> None:
    """``--out`` must be a new variable's name, not one that Python or IPython relies on: rebinding ``print``,
    ``Out`` or ``get_ipython`` breaks the session or every later magic."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise RequestError(f"--out must be a variable name, got {name!r}")
    if name in _IPYTHON_NAMES or _IPYTHON_NUMBERED.match(name):
        owner = "one of IPython's own names (its output cache, history or shell)"
    elif name.startswith("__") and name.endswith("__"):
        owner = "one of Python's own module names"
    elif hasattr(builtins, name):
        owner = "a Python builtin"
    else:
        return
    raise RequestError(f"--out {name!r} is {owner}; storing the result there would replace it: choose another name")


def _check_save(path: str, num_images: int, seed: int | None) -> None:
    """``save_images``' own checks, before any work: the folder, the extension, no file or link to write over."""
    target = Path(path).expanduser()
    try:
        if target.is_dir():
            return  # in a folder mlnb names the images, each the first free name for its seed
        # a name without an extension in an existing folder: save_paths would call it a missing folder
        no_name = target.parent.is_dir() and not target.suffix
        if not no_name:
            check_targets(save_paths(path, num_images, seed or 0))
    except (OSError, ValueError) as exc:  # no such folder, not an image name, a name the OS refuses, a file there
        raise RequestError(f"--save: {exc}") from None
    if no_name:
        raise RequestError(f"--save: {path!r} is neither an existing folder nor a .png/.jpg/.webp file name")


# The magic's option for each generation argument whose name differs from the option's.
_OPTION_NAMES = {"mask_image": "--mask"}


def _spell(name: str) -> str:
    return _OPTION_NAMES.get(name) or "--" + name.replace("_", "-")


def _image_value(text: str | None, user_ns: dict, option: str):
    """What ``--image``/``--mask`` names: a notebook variable's value (a PIL image, or a path) when the text is
    the name of one, else the path as typed."""
    if text is None:
        return None
    if text.isidentifier() and text in user_ns:
        return user_ns[text]
    if text.isidentifier() and not Path(text).expanduser().exists():
        raise RequestError(f"{option}: {text!r} is neither an image file nor a notebook variable")
    return text


def _loras(given: list[str] | None) -> tuple[LoraSpec, ...]:
    try:
        return parse_loras([LoraSpec.parse(text) for text in given or ()])
    except InvalidArgumentError as exc:
        raise RequestError(f"--lora: {exc}") from None


def build_request(args, cell: str, user_ns: dict) -> GenerateRequest:
    """Check everything a user can get wrong before any model is touched.

    Args:
        args: the parsed ``magic_arguments`` namespace.
        cell: the cell body (the prompt).
        user_ns: the notebook namespace for ``{var}``.

    Raises:
        RequestError: one line naming the option and the rule.
    """
    setting = None  # the session's (%vram level), unless --level or --vram names one
    if args.level:
        try:
            setting = MemorySetting.of_level(args.level)
        except InvalidArgumentError as exc:
            raise RequestError(f"--level: {exc}") from None
    prompt = expand_prompt(cell or "", user_ns).strip()
    if not prompt:
        raise RequestError("the prompt is empty: write it in the cell body below %%generate")
    negative = args.negative or None  # as typed: IPython has already expanded {var} in the option line
    steps = _DEFAULT_STEPS if args.steps is None else args.steps
    loras = _loras(args.lora)
    image = _image_value(args.image, user_ns, "--image")
    mask = _image_value(args.mask, user_ns, "--mask")
    try:  # the rules generate applies, checked once, before the model loads, named as the options are
        generation = GenerationArgs.checked(prompt, negative, steps, args.guidance, args.seed, args.width, args.height,
                                            args.num_images, spell=_spell, image=image,
                                            strength=args.strength, mask_image=mask)
    except InvalidArgumentError as exc:
        raise RequestError(str(exc)) from None
    if args.out is not None:
        _check_out(args.out)
    if args.save:
        _check_save(args.save, args.num_images, args.seed)
    if getattr(args, "vram", None):  # replaces the session's setting too
        try:
            setting = MemorySetting.of_budget(args.vram, typed=True)
        except InvalidArgumentError as exc:
            raise RequestError(f"--vram: {exc}") from None
        if args.level:
            raise RequestError("--vram and --level cannot both be given: a budget replaces the level")
    return GenerateRequest(
        model=os.fspath(args.model) if args.model else None, setting=setting, args=generation, out=args.out,
        save=args.save, quiet=bool(args.quiet), allow_pickle=bool(args.allow_pickle), loras=loras,
    )
