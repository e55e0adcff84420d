"""Where a measurement was made, for the JSON the measuring scripts here write beside their tables."""

from __future__ import annotations

import json
import platform
import sys
import time


def provenance(versions: dict[str, str]) -> dict:
    """The machine, the given package versions, today's date and the command line."""
    return {
        "machine": f"{platform.machine()}, {platform.processor() or 'unknown cpu'}, Python {platform.python_version()}",
        "versions": versions,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python " + " ".join(sys.argv),
    }


def write_json(path: str | None, result: dict) -> None:
    """Write ``result`` to ``path`` (nothing without one)."""
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
