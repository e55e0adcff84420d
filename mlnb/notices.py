"""Notices said in one line: the libraries' known notices, and a budget plan that a CPU does not apply.

diffusers and transformers warn, through their own loggers, about things a notebook user cannot act on or that mlnb
says better: a missing torchvision (an image processor falls back to its PIL version), a hub that cannot be reached
(mlnb's own error follows and says what to do), a prompt longer than CLIP reads (two warnings, one of them the whole
dropped text). :func:`install` puts a filter on the loggers that emit them: each such record is lowered to DEBUG on
its own logger, so it shows only where that logger is set to DEBUG, with the library's full text (for example
``transformers.logging.set_verbosity_debug()``); the truncation becomes one mlnb line instead::

    prompt truncated to 77 tokens (dropped: "all pine trees in the fog, a wooden…")

The filters sit on the loggers by name, so they work before the library is imported and whatever handlers it
configures later. Nothing is installed on import.
"""

from __future__ import annotations

import ast
import logging
import re
import threading
import time
from typing import Callable

__all__ = ["install", "new_cell", "truncation_line", "plan_not_applied"]

logger = logging.getLogger(__name__)

# Loggers that emit the notices, by name (a logger's filters see only the records it creates itself).
_LOGGERS = (
    "transformers.utils.import_utils",  # "`CLIPImageProcessor` requires torchvision (not installed); falling back"
    "transformers.tokenization_utils_base",  # "Token indices sequence length is longer than the specified maximum"
    "diffusers.pipelines.pipeline_utils",  # "Couldn't connect to the Hub: ...\nWill try to load from local cache."
    "diffusers.pipelines.pipeline_loading_utils",
    # The pipelines mlnb generates with; any other pipeline's logger is found once its module is imported.
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint",
)
_PIPELINES = "diffusers.pipelines."
_TRUNCATED = re.compile(r"truncated because CLIP can only handle sequences up to (\d+) tokens: (.*)", re.DOTALL)
_DROPPED_CHARS = 40
# SDXL's two text encoders each warn about the same prompt, one encoder's forward apart; a new cell says it again.
_REPEAT_SECONDS = 5.0


def truncation_line(message: str) -> str | None:
    """The one line for diffusers' CLIP truncation warning, or None when ``message`` is not one.

    Example:
        ```python
        >>> truncation_line("The following part of your input was truncated because CLIP can only handle "
        ...                 "sequences up to 77 tokens: ['all pine trees']")
        'prompt truncated to 77 tokens (dropped: "all pine trees")'
        ```
    """
    match = _TRUNCATED.search(message)
    if match is None:
        return None
    try:
        dropped = ast.literal_eval(match[2].strip())
        text = dropped[0] if isinstance(dropped, (list, tuple)) and dropped else str(dropped)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        text = match[2].strip()
    text = " ".join(str(text).split())
    if len(text) > _DROPPED_CHARS:
        text = text[:_DROPPED_CHARS].rstrip() + "…"
    return f'prompt truncated to {match[1]} tokens (dropped: "{text}")'


def _is_noise(message: str) -> bool:
    """A notice the user cannot act on, or that mlnb's own line or error says instead."""
    return (
        ("requires torchvision" in message and "falling back to" in message)
        or message.startswith("Token indices sequence length is longer than the specified maximum sequence length")
        or message.startswith("Couldn't connect to the Hub")
    )


class _LibraryNotices(logging.Filter):
    """Lowers the known notices to DEBUG on their own logger (shown only where it is set to DEBUG) and says the
    truncation once in an mlnb line; every other record passes unchanged."""

    def __init__(self, say: Callable[[str], None]) -> None:
        super().__init__("")
        self._say = say
        self._last: dict[int, tuple[str, float]] = {}  # thread -> (line, when): SDXL's second encoder repeats it

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot format is the library's to report
            return True
        line = truncation_line(message)
        if line is None and not _is_noise(message):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        if line is not None:
            self._say_once(record.thread, line)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)

    def forget(self) -> None:
        self._last.clear()

    def _say_once(self, thread: int | None, line: str) -> None:
        now = time.monotonic()
        last = self._last.get(thread or 0)
        if last is not None and last[0] == line and now - last[1] < _REPEAT_SECONDS:
            return
        self._last[thread or 0] = (line, now)
        self._say(line)


_filter = _LibraryNotices(logger.warning)
_lock = threading.Lock()


def install() -> None:
    """Put the notices' filter on the libraries' loggers that emit them (idempotent, imports nothing): the names
    known in advance, and every diffusers pipeline logger that exists by now."""
    with _lock:
        names = set(_LOGGERS)
        names.update(n for n in list(logging.Logger.manager.loggerDict) if n.startswith(_PIPELINES))
        for name in names:
            library_logger = logging.getLogger(name)
            if _filter not in library_logger.filters:
                library_logger.addFilter(_filter)


def new_cell() -> None:
    """A new cell starts (the per-cell hook calls this): a line said in the last cell is said again in this one. The
    repeats dropped are those of one prompt's encoders, not the next cell's."""
    _filter.forget()


def plan_not_applied(plan) -> str:
    """The one line a budget gets where there is no GPU: the plan is shown, not applied (its predicted GPU peak
    means nothing for a pipeline that runs whole in host memory).

    Args:
        plan: the :class:`~mlnb.plan.Plan` made for the budget, or its text (``str(plan)``).

    Example:
        ```python
        >>> plan_not_applied("plan for 2.0 GiB: resident; predicted peak 518.4 MiB of 2.0 GiB")
        'plan for 2.0 GiB: resident (shown, not applied: no GPU, the pipeline runs on the CPU)'
        ```
    """
    return f"{str(plan).split(';')[0]} (shown, not applied: no GPU, the pipeline runs on the CPU)"
