"""The dashboard's Generate panel: a form, a progress bar over the denoising steps, the image and the report line.

The generation runs in a worker thread so the kernel keeps answering (the gauges keep moving, other cells run).
The worker only calls the session's generation use case (:func:`mlnb.session.generate_images`, as ``%%generate``
does) and sets widget traits; an error becomes one line in the panel and the form stays usable.
"""

from __future__ import annotations

import html
import io
import logging
import threading
from typing import Sequence

import ipywidgets as widgets

from ..errors import InvalidArgumentError, MlnbError
from ..logs import routed
from .state import one_line

logger = logging.getLogger(__name__)

__all__ = ["GeneratePanel", "form_args"]

_WIDE = {"description_width": "90px"}
_MAX_IMAGE_PX = 512


def _optional_int(text: str, name: str, blank: str) -> int | None:
    text = (text or "").strip()
    if not text or text.lower() == blank:
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidArgumentError(f"{name} must be a whole number or blank ({blank}), got {text!r}") from None


def form_args(prompt: str, negative: str, steps: int, seed: str, width: str, height: str):
    """The form's fields as checked generation arguments, a :class:`~mlnb.pipeline.GenerationArgs` (pure).

    Blank seed means random; blank width/height mean the model's native size. The values are checked here, once,
    with ``generate``'s own rules (positive multiples of 8, a non-empty prompt...), before any model is loaded.

    Args:
        prompt, negative: the prompt and the negative prompt (blank: none).
        steps: denoising steps.
        seed, width, height: the text of those fields; blank for random / native.

    Raises:
        InvalidArgumentError: an empty prompt, a number field that is not a whole number, or a value ``generate``
            refuses; the message names the field.

    Example:
        ```python
        >>> form_args("a fox", "", 2, "7", "64", "").seed
        7
        ```
    """
    from ..pipeline.validation import GenerationArgs

    if not prompt.strip():
        raise InvalidArgumentError("the prompt is empty: type it in the prompt field")
    return GenerationArgs.checked(
        prompt,
        negative_prompt=negative.strip() or None,
        steps=int(steps),
        seed=_optional_int(seed, "seed", "random"),
        width=_optional_int(width, "width", "native"),
        height=_optional_int(height, "height", "native"),
    )


def png_bytes(image) -> bytes:
    """A PIL image as PNG bytes for an ``Image`` widget."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class GeneratePanel(widgets.VBox):
    """Prompt, negative prompt, steps, seed, size and a Generate button over the session's model and level.

    The model is ``mlnb.session.default_model()`` and the memory setting ``mlnb.session.defaults.setting`` at the
    moment the button is pressed. The result is stored where ``mlnb.last_result()`` finds it.

    Args:
        also_disable: widgets to disable while a generation runs (the dashboard's Free memory button).
        **kwargs: passed to ``ipywidgets.VBox``.

    Example:
        ```python
        >>> panel = mlnb.dashboard().generate_panel
        >>> panel.prompt.value, panel.steps.value = "a watercolor fox", 20
        >>> panel.generate().join(timeout=600)
        >>> panel.result.report_line()
        ```
    """

    def __init__(self, also_disable: Sequence[widgets.Widget] = (), **kwargs) -> None:
        prompt = widgets.Textarea(
            value="", placeholder="a watercolor fox in a snowy forest", description="prompt",
            style=_WIDE, layout=widgets.Layout(width="98%", height="56px"),
        )
        negative = widgets.Text(value="", placeholder="(optional)", description="negative", style=_WIDE,
                                layout=widgets.Layout(width="98%"))
        steps = widgets.IntText(value=20, description="steps", style=_WIDE, layout=widgets.Layout(width="160px"))
        seed = widgets.Text(value="", placeholder="random", description="seed", style=_WIDE,
                            layout=widgets.Layout(width="200px"))
        width = widgets.Text(value="", placeholder="native", description="width", style=_WIDE,
                             layout=widgets.Layout(width="170px"))
        height = widgets.Text(value="", placeholder="native", description="height", style=_WIDE,
                              layout=widgets.Layout(width="170px"))
        button = widgets.Button(description="Generate", button_style="primary")
        progress = widgets.IntProgress(value=0, min=0, max=1, description="steps", style=_WIDE)
        status = widgets.HTML(value="")
        image = widgets.Image(value=b"", format="png", layout=widgets.Layout(display="none"))
        report = widgets.HTML(value="")
        button.add_class("mlnb-generate-button")
        image.add_class("mlnb-result-image")
        report.add_class("mlnb-report")
        status.add_class("mlnb-generate-status")
        super().__init__(
            children=[
                prompt, negative, widgets.HBox([steps, seed, width, height]),
                widgets.HBox([button, progress, status]), image, report,
            ],
            **kwargs,
        )
        self.prompt, self.negative, self.steps, self.seed = prompt, negative, steps, seed
        self.width, self.height = width, height
        self.button, self.progress, self.status, self.image, self.report = button, progress, status, image, report
        self.result = None  # the last GenerationResult shown
        self.notes: list[str] = []  # mlnb's warnings from the generation thread (the plan, an unload), shown
        self.library_notes: list[str] = []  # what diffusers/transformers logged or warned from it (kept, not shown)
        self.error: str | None = None  # the last error line shown
        self._also_disable = list(also_disable)
        self._worker: threading.Thread | None = None
        button.on_click(self._on_click)

    # -- state shown ---------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _set_running(self, running: bool) -> None:
        for widget in [self.button, *self._also_disable]:
            widget.disabled = running

    def _show_status(self, text: str, error: bool = False) -> None:
        style = "color:#b00" if error else "color:#555"
        self.status.value = f"<span style='{style}'>{html.escape(text)}</span>" if text else ""

    def _on_progress(self, step: int, total: int) -> None:
        # Called by the pipeline after each denoising step, in the worker thread: traits only.
        if self.progress.max != total:
            self.progress.max = total
        self.progress.value = step

    def _show_result(self, result) -> None:
        self.result = result
        self.image.value = png_bytes(result.image)
        # An explicit CSS width: some frontends stretch images to the output's width.
        self.image.layout.width = f"{min(result.image.width, _MAX_IMAGE_PX)}px"
        self.image.layout.display = None
        self.report.value = f"<code>{html.escape(result.report_line())}</code>"
        self._show_status(" · ".join([f"done, seed {result.seed}"] + self.notes))

    def _show_error(self, exc: BaseException) -> None:
        self.error = one_line(exc)
        self._show_status(f"error: {self.error}", error=True)

    # -- actions ------------------------------------------------------------------------------------------------

    def generate(self) -> threading.Thread | None:
        """Start a generation from the form's values, as the button does; returns the worker (None on a form error).

        Example:
            ```python
            >>> panel.prompt.value = "a fox"
            >>> panel.generate()
            >>> panel.wait(timeout=600)
            ```
        """
        from ..session import resolve

        if self.running:
            return self._worker
        self.error = None
        self.notes, self.library_notes = [], []  # this generation's, as in __init__
        try:
            args = form_args(
                self.prompt.value, self.negative.value, self.steps.value, self.seed.value,
                self.width.value, self.height.value,
            )
            model, setting = resolve()  # the session's, as the button is pressed
        except (MlnbError, ValueError) as exc:
            self._show_error(exc)
            return None
        self.progress.max, self.progress.value = max(1, args.steps), 0
        self._set_running(True)
        what = f"for a {setting} budget" if setting.budget is not None else f"at {setting.kind} {setting}"
        self._show_status(f"loading {model} {what}…")
        worker = threading.Thread(target=self._run, args=(args, model, setting), name="mlnb-generate", daemon=True)
        self._worker = worker
        worker.start()
        return worker

    def _on_click(self, _button) -> None:
        self.generate()

    def _show_loaded(self, managed) -> None:
        self._show_status(f"generating with the {managed.tag} plan…" if managed.plan is not None
                          else f"generating at level {managed.level.value}…")

    def _run(self, args, model: str, setting) -> None:
        from ..session import generate_images

        # Nothing may escape this thread: threading's excepthook would print a traceback into whichever cell runs,
        # and so would mlnb's warnings (the plan, an unload): they go to the panel's notes, the libraries' log lines
        # and warnings.warn calls to its library notes.
        try:
            with routed(self.notes.append, libraries=self.library_notes.append):
                try:
                    result = generate_images(args, model, setting, progress=self._on_progress,
                                             loaded=self._show_loaded)
                    self._show_result(result)
                except (MlnbError, ValueError) as exc:
                    logger.debug("dashboard generation failed: %s", exc)
                    self._show_error(exc)
                except Exception as exc:  # anything else: still one line; the traceback at debug level
                    logger.debug("dashboard generation failed", exc_info=True)
                    self._show_error(exc)
        finally:
            self._set_running(False)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the running generation; True when none is running any more."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
        return not self.running
