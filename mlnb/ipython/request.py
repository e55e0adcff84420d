"""Turning ``%%generate`` options and a cell body into a checked generation request (pure, no torch)."""

from __future__ import annotations

import keyword
import os
import string
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgumentError
from ..pipeline.result import save_paths
from ..pipeline.validation import GenerationArgs
from ..setting import MemorySetting

__all__ = ["GenerateRequest", "RequestError", "build_request", "expand_prompt"]


_DEFAULT_STEPS = 30


class RequestError(ValueError):
    """A user mistake in the magic's options or prompt; the UI turns it into a one-line ``UsageError``."""


@dataclass(frozen=True)
class GenerateRequest:
    """A checked ``%%generate`` cell: what to generate, and the model and memory setting when the options name them
    (None: the session's, which the generation use case resolves)."""

    model: str | None
    setting: MemorySetting | None
    args: GenerationArgs
    out: str | None
    save: str | None
    quiet: bool
    allow_pickle: bool


class _Namespace(dict):
    """``format_map`` mapping over the notebook namespace that reports the first missing name."""

    def __init__(self, user_ns: dict, what: str) -> None:
        super().__init__()
        self.user_ns = user_ns
        self.what = what

    def __missing__(self, key):
        if key in self.user_ns:
            return self.user_ns[key]
        raise RequestError(f"{{{key}}} in {self.what} names no variable in the notebook (write {{{{ for a literal brace)")


def expand_prompt(text: str, user_ns: dict, what: str = "the prompt") -> str:
    """Expand ``{var}`` (and ``{var.attr}``, ``{var[0]}``) from the namespace; ``{{``/``}}`` are literal braces.

    ``what`` names the text in errors (``"the prompt"``, ``"--negative"``).
    """
    try:
        # Parse first so an unmatched brace is reported as such, not as a missing name.
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError as exc:
        raise RequestError(f"{what} has a stray brace ({exc}); write {{{{ or }}}} for a literal brace") from None
    for field in fields:
        if field == "" or field.split(".")[0].split("[")[0].isdigit():
            raise RequestError(
                f"{what} has {{{field}}}: name a notebook variable inside the braces, or write {{{{ and }}}} for braces"
            )
    try:
        return text.format_map(_Namespace(user_ns, what))
    except RequestError:
        raise
    except Exception as exc:  # a bad format spec or conversion, an index, an attribute, a __format__ that raises
        raise RequestError(f"cannot expand {what}: {type(exc).__name__}: {exc}") from None


def _check_save(path: str, num_images: int, seed: int | None) -> None:
    """``save_images``' own checks, before any work: the folder, the extension, no file to overwrite."""
    target = Path(path).expanduser()
    try:
        if target.is_dir() and seed is None:
            return  # the names in a folder carry the seed, drawn when the image is made
        # a name without an extension in an existing folder: save_paths would call it a missing folder
        no_name = not target.is_dir() and target.parent.is_dir() and not target.suffix
        existing = [] if no_name else [p for p in save_paths(path, num_images, seed or 0) if p.exists()]
    except (OSError, ValueError) as exc:  # no such folder, not an image name, a name the OS refuses
        raise RequestError(f"--save: {exc}") from None
    if no_name:
        raise RequestError(f"--save: {path!r} is neither an existing folder nor a .png/.jpg/.webp file name")
    if existing:
        raise RequestError(f"--save: {str(existing[0])!r} exists; mlnb never overwrites, choose another name")


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
    negative = expand_prompt(args.negative, user_ns, "--negative") if args.negative else None
    steps = _DEFAULT_STEPS if args.steps is None else args.steps
    try:  # the rules generate applies, checked once, before the model loads, named as the options are
        generation = GenerationArgs.checked(prompt, negative, steps, args.guidance, args.seed, args.width, args.height,
                                            args.num_images, spell=lambda name: "--" + name.replace("_", "-"))
    except InvalidArgumentError as exc:
        raise RequestError(str(exc)) from None
    if args.out is not None and (not args.out.isidentifier() or keyword.iskeyword(args.out)):
        raise RequestError(f"--out must be a variable name, got {args.out!r}")
    if args.save:
        _check_save(args.save, args.num_images, args.seed)
    if getattr(args, "vram", None):  # replaces the session's setting too
        try:
            setting = MemorySetting.of_budget(args.vram)
        except InvalidArgumentError as exc:
            raise RequestError(f"--vram: {exc}") from None
        if args.level:
            raise RequestError("--vram and --level cannot both be given: a budget replaces the level")
    return GenerateRequest(
        model=os.fspath(args.model) if args.model else None, setting=setting, args=generation, out=args.out,
        save=args.save, quiet=bool(args.quiet), allow_pickle=bool(args.allow_pickle),
    )
