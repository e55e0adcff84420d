"""Turning ``%%generate`` options and a cell body into a checked generation request (pure, no torch)."""

from __future__ import annotations

import keyword
import os
import string
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgumentError
from ..levels import AUTO, parse_level
from ..pipeline.managed import validate_generation_args
from ..pipeline.result import save_paths
from ..session import budget_of
from ..units import parse_bytes

__all__ = ["GenerateRequest", "RequestError", "build_request", "expand_prompt"]


_DEFAULT_STEPS = 30


class RequestError(ValueError):
    """A user mistake in the magic's options or prompt; the UI turns it into a one-line ``UsageError``."""


@dataclass(frozen=True)
class GenerateRequest:
    model: str
    level: str
    prompt: str
    negative: str | None
    steps: int
    guidance: float | None
    seed: int | None
    width: int | None
    height: int | None
    num_images: int
    out: str | None
    save: str | None
    quiet: bool
    allow_pickle: bool
    budget: int | None = None

    def generate_kwargs(self) -> dict:
        return dict(
            prompt=self.prompt, negative_prompt=self.negative, steps=self.steps, guidance=self.guidance,
            seed=self.seed, width=self.width, height=self.height, num_images=self.num_images,
        )


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


def build_request(args, cell: str, user_ns: dict, default_model: str | None, default_level: str) -> GenerateRequest:
    """Check everything a user can get wrong before any model is touched.

    Args:
        args: the parsed ``magic_arguments`` namespace.
        cell: the cell body (the prompt).
        user_ns: the notebook namespace for ``{var}``.
        default_model: the remembered model or ``$MLNB_MODEL``.
        default_level: the session's default level, or its default budget (``"4.0 GiB"``).

    Raises:
        RequestError: one line naming the option and the rule.
    """
    model = args.model or default_model
    if not model:
        raise RequestError(
            "no model: name one with %%generate --model ID_OR_FOLDER (it is remembered for later cells), "
            "or set MLNB_MODEL"
        )
    level = args.level or default_level
    default_budget = None if args.level else budget_of(default_level)
    if default_budget is not None:  # the session's default is a budget (%vram level 4GiB); --vram replaces it
        level = AUTO
    try:
        parse_level(level)
    except ValueError as exc:
        raise RequestError(f"--level: {exc}") from None
    prompt = expand_prompt(cell or "", user_ns).strip()
    if not prompt:
        raise RequestError("the prompt is empty: write it in the cell body below %%generate")
    negative = expand_prompt(args.negative, user_ns, "--negative") if args.negative else None
    steps = _DEFAULT_STEPS if args.steps is None else args.steps
    try:  # the rules generate applies, checked before the model loads, named as the options are
        validate_generation_args(prompt, steps, args.width, args.height, args.num_images, args.guidance, args.seed,
                                 spell=lambda name: "--" + name.replace("_", "-"))
    except InvalidArgumentError as exc:
        raise RequestError(str(exc)) from None
    if args.out is not None and (not args.out.isidentifier() or keyword.iskeyword(args.out)):
        raise RequestError(f"--out must be a variable name, got {args.out!r}")
    if args.save:
        _check_save(args.save, args.num_images, args.seed)
    budget = default_budget
    if getattr(args, "vram", None):  # replaces the session's budget too
        try:
            budget = parse_bytes(args.vram)
        except ValueError as exc:
            raise RequestError(f"--vram: {exc}") from None
        if args.level:
            raise RequestError("--vram and --level cannot both be given: a budget replaces the level")
    return GenerateRequest(
        model=os.fspath(model), level=level, prompt=prompt, negative=negative, steps=steps,
        guidance=args.guidance, seed=args.seed, width=args.width, height=args.height, num_images=args.num_images,
        out=args.out, save=args.save, quiet=bool(args.quiet), allow_pickle=bool(args.allow_pickle), budget=budget,
    )
