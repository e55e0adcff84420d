"""The record of what the optimizer did: every technique applied, or skipped with its reason."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Iterator

from ..levels import OptimizationLevel, Technique

__all__ = ["TechniqueResult", "OptimizationReport"]


@dataclass(frozen=True)
class TechniqueResult:
    """One technique's outcome.

    Args:
        technique: which of the eleven.
        applied: True only if the technique actually ran on this pipeline.
        detail: what was done, or why it was skipped.
        label: short text for the one-line report (applied techniques only), e.g. ``"VAE fp16 tiles 512"``.
    """

    technique: Technique
    applied: bool
    detail: str
    label: str | None = None

    def __str__(self) -> str:
        mark = "applied" if self.applied else "skipped"
        return f"{self.technique.value:<24} {mark:<8} {self.detail}"


@dataclass(frozen=True)
class OptimizationReport:
    """The applied/skipped list for one pipeline, in the order the techniques were considered."""

    level: OptimizationLevel
    results: tuple[TechniqueResult, ...]

    def __iter__(self) -> Iterator[TechniqueResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, technique: Technique | str) -> TechniqueResult:
        try:
            key = Technique(technique)
        except ValueError:  # a mapping's missing key, named with the ones there are
            names = ", ".join(t.value for t in Technique)
            raise KeyError(f"{technique!r} is not a technique; use one of {names}") from None
        for result in self.results:
            if result.technique is key:
                return result
        raise KeyError(key.value)

    @property
    def applied(self) -> list[TechniqueResult]:
        return [r for r in self.results if r.applied]

    @property
    def skipped(self) -> list[TechniqueResult]:
        return [r for r in self.results if not r.applied]

    def is_applied(self, technique: Technique | str) -> bool:
        return self[technique].applied

    def summary(self) -> str:
        """The labels of applied memory techniques, e.g. ``"group offload leaf+stream, VAE fp16 tiles 512"``."""
        labels = [r.label for r in self.results if r.applied and r.label]
        return ", ".join(labels) if labels else "no memory techniques"

    def __str__(self) -> str:
        return "\n".join([f"level {self.level.value}: {self.summary()}", *(f"  {r}" for r in self.results)])

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{r.technique.value}</td><td>{'applied' if r.applied else 'skipped'}</td>"
            f"<td>{html.escape(r.detail)}</td></tr>"
            for r in self.results
        )
        caption = html.escape(f"level {self.level.value}: {self.summary()}")
        return (
            f"<table class='mlnb-techniques'><caption>{caption}</caption>"
            f"<tr><th>technique</th><th></th><th>detail</th></tr>{rows}</table>"
        )
