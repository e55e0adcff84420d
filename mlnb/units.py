"""Pure helpers for sizes: formatting bytes for people and parsing sizes people type."""

from __future__ import annotations

import math
import re

__all__ = ["GiB", "MiB", "GB", "format_bytes", "format_gib", "parse_bytes"]

KiB = 2**10
MiB = 2**20
GiB = 2**30
GB = 10**9

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3, "kb": 10**3, "kib": KiB,
    "m": 10**6, "mb": 10**6, "mib": MiB,
    "g": 10**9, "gb": 10**9, "gib": GiB,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}


def format_bytes(n: int | float | None, na: str = "N/A", up: bool = False) -> str:
    """``1536 -> '1.5 KiB'``; ``None -> 'N/A'``. Binary units, one decimal, sign kept. With ``up``, a positive size
    is rounded up to the decimal shown (a minimum to ask for: ``1.049 GiB -> '1.1 GiB'``, never ``'1.0 GiB'``)."""
    if n is None:
        return na
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            value = math.ceil(n / size * 10) / 10 if up and not sign else n / size
            return f"{sign}{value:.1f} {unit}"
    return f"{sign}{math.ceil(n) if up else int(n)} B"


def format_gib(n: int | float | None, na: str = "N/A", digits: int = 1) -> str:
    """Bytes as a bare GiB figure: ``3.7`` (used in the one-line report's ``peak 3.7 / 4.0 GiB``)."""
    if n is None:
        return na
    return f"{n / GiB:.{digits}f}"


def parse_bytes(text: str | int | float) -> int:
    """Parse ``'4GiB'``, ``'4 GB'``, ``'512MiB'`` or a plain number of bytes.

    Raises:
        ValueError: naming the text and the accepted forms.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"cannot read size {text!r}: give bytes (an int) or a string such as 4GiB, 4GB or 512MiB")
    if isinstance(text, float) and not math.isfinite(text):
        raise ValueError(f"size must be a finite number of bytes, got {text}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"size must be >= 0, got {text}")
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: use a number with a unit such as 4GiB, 4GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
