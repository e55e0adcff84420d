"""``%%generate`` and ``%vram``: parse, call the core, return a result object.

User mistakes and mlnb's own one-line errors become ``UsageError``: IPython shows one line, no traceback.
"""

from __future__ import annotations

import logging

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from .. import session
from ..device import get_device
from ..errors import MlnbError
from ..levels import LEVEL_NAMES
from ..monitor import Skipped, cell_history
from ..setting import MemorySetting
from .options import HelpRequested, help_argument, parse_options
from .request import RequestError, build_request
from .results import Notice, history_table, who_table
from .tensors import (
    drop_outputs, stored_traceback, tensors_in_namespace, tensors_in_outputs, tensors_only_in_traceback,
)

logger = logging.getLogger(__name__)

__all__ = ["MlnbMagics"]

_VRAM_ACTIONS = ["status", "history", "free", "who", "on", "off", "verbose", "level", "dashboard"]


class _ProgressBar:
    """A tqdm bar over the ``total`` denoising steps (tqdm's notebook bar where widgets work), opened once the pipeline
    has loaded (a load error shows no empty bar); nothing at all when quiet."""

    def __init__(self, quiet: bool, total: int) -> None:
        self.quiet = quiet
        self.total = total
        self.bar = None

    def open(self, _managed=None) -> None:
        if not self.quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="generate", unit="step", leave=False)

    def update(self, step: int, total: int) -> None:
        if self.bar is None:
            return
        if self.bar.total != total:
            self.bar.reset(total=total)
        self.bar.n = step
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _parse(magic, line: str, name: str):
    """The options as a shell user types them (quotes removed; see ``options``); None after printing the help."""
    try:
        return parse_options(magic, line, name)
    except HelpRequested as shown:
        print(shown)
        return None


@magics_class
class MlnbMagics(Magics):
    """The magics: each parses what was typed, calls the session, and returns (displays) the result."""

    @magic_arguments("%generate")  # the usage line reads %%generate
    @help_argument
    @argument("--model", help="hub id (org/name) or local diffusers folder; remembered for later cells (or $MLNB_MODEL)")
    @argument("--level", help=f"memory level: {'|'.join(LEVEL_NAMES)} (default: the session's, auto)")
    @argument("--vram", default=None, metavar="SIZE", help="a VRAM budget such as 4GiB instead of a level: keep what fits on the GPU, stream the rest")
    @argument("--steps", type=int, default=None, help="denoising steps (default 30)")
    @argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    @argument("--seed", type=int, default=None, help="seed; the same seed gives the same image (default: random, reported)")
    @argument("--width", type=int, default=None, help="pixels, a multiple of 8 (default: the model's native size)")
    @argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's native size)")
    @argument("--negative", default=None, help="negative prompt, used as written (IPython expands {var} in this line; quote text with spaces)")
    @argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    @argument("--out", default=None, metavar="VAR", help="store the GenerationResult in this variable (not a name of Python's or IPython's)")
    @argument("--save", default=None, metavar="PATH", help="save PNGs to a file or an existing folder; never overwrites a file, never writes through a link")
    @argument("--quiet", action="store_true", help="no progress bar, no display (the result still goes to --out)")
    @argument("--allow-pickle", action="store_true", help="accept pickle weights of the model and its LoRAs (can run code: only for trusted files)")
    @argument("--lora", action="append", default=None, metavar="PATH_OR_ID[:SCALE]", help="a LoRA (.safetensors file, folder or hub id) at a scale (default 1); repeatable. The cell generates with exactly the LoRAs it names: none without --lora")
    @argument("--image", default=None, metavar="PATH_OR_VAR", help="image-to-image: start from this image file, or the notebook variable holding a PIL image")
    @argument("--strength", type=float, default=None, help="with --image: how much may change, in (0, 1] (default: the pipeline's)")
    @argument("--mask", default=None, metavar="PATH_OR_VAR", help="with --image: inpaint where this mask (file or variable, the image's size) is white")
    @cell_magic
    def generate(self, line: str, cell: str):
        """Generate images from the prompt in the cell body.

        The cell body is the prompt; ``{var}`` (``{var.attr}``, ``{var[0]}``) expands once from the notebook namespace,
        and what the variable holds is used as it is. Options are read as a shell reads them: quote a value with
        spaces (``--negative "blurry, low quality"``, ``--model "/content/my models/sd"``). Prints a progress bar,
        then shows the images and one report line. The result also goes to ``--out VAR`` and ``mlnb.last_result()``.

        ``--lora`` sets the LoRAs of this cell's generation: the pipeline keeps its weights and changes only its
        adapters, and a later cell without ``--lora`` generates without LoRAs. ``--image`` (and ``--mask``) take a
        file or the name of a notebook variable holding a PIL image (``--image result.image`` is not a name: store
        it first, ``start = result.image``).
        """
        args = _parse(self.generate, line, "%%generate")
        if args is None:  # --help
            return None
        try:
            req = build_request(args, cell, self.shell.user_ns)
        except RequestError as exc:
            raise UsageError(str(exc)) from None
        bar = _ProgressBar(req.quiet, req.args.steps)
        try:
            result = session.generate_images(req.args, req.model, req.setting, allow_pickle=req.allow_pickle,
                                             progress=None if req.quiet else bar.update, loaded=bar.open,
                                             loras=req.loras)
        except MlnbError as exc:
            raise UsageError(str(exc)) from None
        finally:
            bar.close()
        if req.out:
            self.shell.user_ns[req.out] = result
        if req.save:
            try:
                saved = result.save(req.save)
            except (OSError, ValueError) as exc:  # checked before generating, but a disk can be full or refuse
                if not req.quiet:
                    from IPython.display import display

                    display(result)
                where = f"{req.out} and mlnb.last_result()" if req.out else "mlnb.last_result()"
                raise UsageError(f"--save: {exc}; the images are in {where}") from None
            print(f"saved {', '.join(str(p) for p in saved)}")
        return None if req.quiet else result

    @magic_arguments()
    @help_argument
    @argument("action", nargs="?", default="status", help=f"one of: {', '.join(_VRAM_ACTIONS)}")
    @argument("name", nargs="?", default=None, help="the level (or a VRAM budget such as 4GiB) for `%%vram level NAME`")
    @argument("--outputs", action="store_true", help="with `free`: also drop Out-cache entries that pin GPU tensors")
    @argument("-n", "--top", type=int, default=10, help="rows for `who` and `history`")
    @line_magic
    def vram(self, line: str = ""):
        """GPU memory: status table, per-cell history, free, who holds tensors, monitor on/off, default level."""
        args = _parse(self.vram, line, "%vram")
        if args is None:  # --help
            return None
        action = args.action
        if action not in _VRAM_ACTIONS:
            raise UsageError(f"%vram: unknown action {action!r}; use one of {', '.join(_VRAM_ACTIONS)}")
        if args.name is not None and action != "level":
            raise UsageError(f"%vram {action} takes no argument, got {args.name!r}")
        if args.outputs and action != "free":
            raise UsageError("--outputs goes with %vram free")
        if args.top < 1:
            raise UsageError(f"%vram {action}: -n must be >= 1, got {args.top}")
        device = get_device()
        if action == "status":
            return session.status(device)
        if action == "history":
            return history_table(cell_history, args.top)
        if action == "free":
            skipped = Skipped()
            drop = (lambda: drop_outputs(self.shell, device, skipped)) if args.outputs else None
            try:
                report = session.free_memory(device, drop_outputs=drop)
            except MlnbError as exc:  # interrupted while a pipeline waited for the dashboard's generation
                raise UsageError(str(exc)) from None
            if skipped:
                print(f"[mlnb] %vram free --outputs {skipped.line()}")
            return report
        if action == "who":
            host = not device.has_memory_counters  # no GPU: the host tensors are what a CPU session runs short of
            skipped = Skipped()
            tb = stored_traceback(self.shell)
            sources = {
                "namespace": tensors_in_namespace(self.shell.user_ns, device, skipped, host),
                "Out cache": tensors_in_outputs(self.shell, device, skipped, host),
                "last traceback": tensors_only_in_traceback(tb, self.shell, device, skipped, host),
            }
            return who_table(sources, args.top, host, skipped)
        if action in ("on", "off"):
            session.defaults.monitor = action == "on"
            return Notice(f"per-cell memory monitor {action}")
        if action == "verbose":
            session.defaults.verbose = not session.defaults.verbose
            state = "every cell" if session.defaults.verbose else "only cells that touch the GPU"
            return Notice(f"per-cell line for {state}")
        if action == "level":
            if args.name is None:
                current = session.defaults.setting
                return Notice(f"default {current.kind}: {current}")
            try:
                chosen = MemorySetting.parse(args.name)
            except MlnbError as exc:
                raise UsageError(f"%vram level: {exc}") from None
            session.defaults.setting = chosen
            return Notice(f"default {chosen.kind} for %%generate: {chosen}")
        # dashboard
        try:
            from ..widgets import dashboard
        except ImportError as exc:
            raise UsageError(str(exc)) from None
        try:
            return dashboard()
        except ImportError as exc:
            raise UsageError(str(exc)) from None
