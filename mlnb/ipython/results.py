"""Result objects the magics return: each renders as text (``_repr_pretty_``) and as HTML (``_repr_html_``)."""

from __future__ import annotations

import html
from dataclasses import dataclass

from ..monitor import CellHistory, CellRecord, Skipped, TensorRef
from ..units import format_bytes

__all__ = ["Table", "Notice", "history_table", "who_table"]


def _text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


@dataclass(frozen=True)
class Table:
    """A titled table with an optional footer."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    footer: str = ""

    def __str__(self) -> str:
        parts = [self.title]
        parts.append(_text_table(self.header, list(self.rows)) if self.rows else "(empty)")
        if self.footer:
            parts.append(self.footer)
        return "\n".join(parts)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in self.rows)
        foot = f"<p>{html.escape(self.footer)}</p>" if self.footer else ""
        return f"<table class='mlnb-table'><caption>{html.escape(self.title)}</caption><tr>{head}</tr>{body}</table>{foot}"


@dataclass(frozen=True)
class Notice:
    """A one-line answer (``%vram on``, ``%vram level ultra``...)."""

    text: str

    def __str__(self) -> str:
        return self.text

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(self.text)

    def _repr_html_(self) -> str:
        return f"<code>{html.escape(self.text)}</code>"


def history_table(history: CellHistory, last: int | None = None) -> Table:
    """``%vram history``: one row per monitored cell."""
    records: list[CellRecord] = history.records(last)
    gpu = any(r.report.gpu for r in records)
    title = "per-cell memory (GPU allocated)" if gpu else "per-cell memory (host RSS; no GPU)"
    return Table(title, CellHistory.HEADER, tuple(r.row() for r in records), f"{len(history)} cell(s) recorded")


def who_table(sources: dict[str, list[TensorRef]], top: int = 10, host: bool = False,
              skipped: Skipped | None = None) -> Table:
    """``%vram who``: the largest device tensors and who holds them.

    Args:
        sources: the tensors found in each place (namespace, Out cache, last traceback).
        top: rows shown.
        host: the tensors are host tensors (a session without a GPU); the title says so.
        skipped: the objects the walks skipped, said in the footer.
    """
    refs = sorted((r for group in sources.values() for r in group), key=lambda r: r.nbytes, reverse=True)
    rows = tuple((format_bytes(r.nbytes), r.dtype, "×".join(map(str, r.shape)) or "scalar", r.path) for r in refs[:top])
    totals = ", ".join(f"{name} {format_bytes(sum(r.nbytes for r in group))}" for name, group in sources.items())
    footer = f"totals: {totals}" + (f"; {skipped.line()}" if skipped else "")
    title = "no GPU: largest host tensors reachable from the notebook" if host else (
        "largest GPU tensors reachable from the notebook"
    )
    return Table(title, ("size", "dtype", "shape", "held by"), rows, footer)
