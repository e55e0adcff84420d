"""``GenerationResult``: images plus what it cost. Holds no GPU tensors, so keeping it never pins VRAM."""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..levels import OptimizationLevel
from ..monitor import MemoryReport
from ..notices import plan_not_applied
from ..optimizer import OptimizationReport
from ..setting import AUTO_SETTING, MemorySetting
from ..units import format_bytes, format_gib
from .saving import save_images

if TYPE_CHECKING:
    from ..planner import Plan
    from .loras import LoraSpec

__all__ = ["GenerationResult", "plan_title"]


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of one generation, built once when it ends and never changed afterwards.

    Attributes:
        images: PIL images.
        seed: the seed used (drawn at random when none was given).
        params: prompt, negative prompt, steps, guidance, width, height, num_images.
        memory: the generation's :class:`~mlnb.MemoryReport` (``memory.deferred``: its cleanup was left to the
            deferred release, and ``memory.freed`` is None).
        seconds: wall time of the pipeline call.
        level: the level that produced the images.
        techniques: the applied/skipped list of that level.
        model: the model id or folder.
        setting: the memory setting the pipeline was loaded for, as the user gave it (``auto``, ``ultra``,
            ``3.75 GiB``...).
        rescued_from: the level that ran out of memory first, when the OOM rescue retried.
        notes: what happened before the images came (the OOM rescue's unloads and retries).
        plan: the budget plan (a :class:`mlnb.planner.Plan`) that placed the pipeline, if any.
        predicted_peak: the plan's predicted peak bytes for this size and batch (compare with
            ``memory.peak_allocated``), when a budget was given.
        predicted_seconds: the plan's predicted seconds for these steps and size, when the card's step time is known.
        step_seconds: median seconds of a denoising step (after the first), read from the step callback.
        decode_seconds: seconds from the last step to the images (VAE decode).
        first_step_seconds: seconds from the pipeline call's start to the end of the first step (prompt encoding
            and the first step).
        phase_seconds: wall seconds of :meth:`~mlnb.ManagedPipeline.generate`'s phases: ``before`` the pipeline
            call (checks, prediction, monitor start), the ``pipeline`` call, the monitor's closing ``cleanup``
            (measuring, and the cleanup itself only after an error) and ``after``
            (recording the card's measurements).
        allocator_in_steps: on CUDA, what the caching allocator did from the end of the first step to the end of the
            last (``num_alloc_retries``, ``num_device_alloc``, ``num_device_free`` ...): frees there synchronized
            the device in the middle of the steps.
        loras: the LoRAs the pipeline ran with (each a :class:`~mlnb.pipeline.loras.LoraSpec`: source and scale),
            in the order given.
        image_source: the start image of an image-to-image or inpainting generation as given (its path, or what
            the PIL image was); None for text-to-image.
        mask_source: the inpainting mask as given; None otherwise.
        strength: the strength the derived pipeline ran with (its own default when none was given); None for
            text-to-image.
    """

    images: list
    seed: int
    params: dict[str, Any]
    memory: MemoryReport
    seconds: float
    level: OptimizationLevel
    techniques: OptimizationReport
    model: str
    setting: MemorySetting = AUTO_SETTING
    rescued_from: OptimizationLevel | None = None
    notes: tuple[str, ...] = field(default=())
    plan: Plan | None = None
    predicted_peak: int | None = None
    predicted_seconds: float | None = None
    step_seconds: float | None = None
    decode_seconds: float | None = None
    first_step_seconds: float | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)
    allocator_in_steps: dict[str, int] = field(default_factory=dict)
    loras: tuple[LoraSpec, ...] = field(default=())
    image_source: str | None = None
    mask_source: str | None = None
    strength: float | None = None

    @property
    def image(self):
        """The first image."""
        return self.images[0]

    @property
    def task(self) -> str:
        """``"text2img"``, ``"img2img"`` or ``"inpaint"``."""
        if self.image_source is None:
            return "text2img"
        return "inpaint" if self.mask_source is not None else "img2img"

    def inputs_line(self) -> str:
        """``img2img from fox.png, strength 0.6 · LoRAs ink:0.7, paper`` ('' for text-to-image without LoRAs): what
        the generation started from, each file by its name."""
        parts = []
        if self.image_source is not None:
            start = f"{self.task} from {_short(self.image_source)}"
            if self.mask_source is not None:
                start += f" masked by {_short(self.mask_source)}"
            if self.strength is not None:
                start += f", strength {self.strength:g}"
            parts.append(start)
        if self.loras:
            shown = ", ".join(_short(s.source) + ("" if s.scale == 1 else f":{s.scale:g}") for s in self.loras)
            parts.append(f"LoRA{'s' if len(self.loras) > 1 else ''} {shown}")
        return " · ".join(parts)

    def report_line(self) -> str:
        """``1024×1024 · 30 steps · 41.2 s · peak 3.7 / 4.0 GiB · level ultra (...) · freed when idle``: on a GPU the
        deferred release gives the memory back once the kernel is idle (``freed 3.6 GiB`` where a cleanup ran at
        once)."""
        p = self.params
        parts = [f"{p['width']}×{p['height']}"]
        if p.get("num_images", 1) > 1:
            parts[0] += f" ×{p['num_images']}"
        parts.append(f"{p['steps']} step" + ("" if p["steps"] == 1 else "s"))
        parts.append(f"{self.seconds:.1f} s")
        if self.image_source is not None or self.loras:
            parts.append(self.inputs_line())
        mem = self.memory
        if mem.gpu:
            total = f" / {format_gib(mem.device_total)}" if mem.device_total else ""
            parts.append(f"peak {format_gib(mem.peak_allocated)}{total} GiB")
        else:
            parts.append(f"CPU, host RSS peak {format_bytes(mem.host_peak_rss)}")
        level = f"level {self.level.value} ({self.techniques.summary()})"
        if self.plan is not None:
            level = f"{self.plan_line()}; {self.prediction_line()}" if mem.gpu else plan_not_applied(self.plan_line())
        if self.rescued_from is not None:
            level += f" after OOM at {self.rescued_from.value}"
        parts.append(level)
        parts.append(mem.freed_text())
        return " · ".join(parts)

    def plan_line(self) -> str:
        """``plan for 3.75 GiB: stream, 24 blocks streamed (...), 16 resident`` for a planned generation ('' otherwise),
        the budget as the user gave it."""
        return plan_title(self.plan, self.setting) if self.plan is not None else ""

    def prediction_line(self) -> str:
        """``predicted 3.1 GiB / 4.2 s, measured 3.0 GiB / 4.5 s`` for a planned generation ('' otherwise)."""
        if self.predicted_peak is None:
            return ""
        mem = self.memory
        predicted = f"predicted {format_gib(self.predicted_peak)} GiB"
        if self.predicted_seconds is not None:
            predicted += f" / {self.predicted_seconds:.1f} s"
        measured = f"measured {format_gib(mem.peak_allocated, na='N/A')} GiB / {self.seconds:.1f} s"
        return f"{predicted}, {measured}"

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> list[Path]:
        """Save the images; see :func:`save_images`."""
        return save_images(self.images, path, seed=self.seed, overwrite=overwrite)

    def __repr__(self) -> str:
        return f"GenerationResult({len(self.images)} image(s), seed={self.seed}: {self.report_line()})"

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(self.report_line())

    def _repr_html_(self) -> str:
        imgs = "".join(
            f"<img src='data:image/png;base64,{_png_b64(im)}' style='max-width:100%;margin:2px'/>" for im in self.images
        )
        return f"<div class='mlnb-result'>{imgs}<div><code>{html.escape(self.report_line())}</code></div></div>"


def plan_title(plan: Plan, setting: MemorySetting) -> str:
    """``plan for 3.75 GiB: stream, 24 blocks streamed (...), 16 resident``: the budget as ``setting`` gives it when
    it is that setting's (the user's number and unit), else rounded (a plan auto made for the free memory)."""
    return f"plan for {setting.show_budget(plan.budget)}: {plan.summary()}"


def _short(source: str) -> str:
    """A path by its file or folder name; a hub id or a PIL image's description as it is."""
    if "/" not in source and "\\" not in source:
        return source
    if source.startswith(("/", ".", "~")) or "\\" in source or Path(source).exists():
        return Path(source.rstrip("/\\")).name or source
    return source  # a hub id, org/name


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
