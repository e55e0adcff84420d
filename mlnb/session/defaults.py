"""The notebook session's defaults, which ``%%generate`` and the dashboard's Generate button share.

The UIs parse what the user typed (``%vram level 3.75GiB``, the dashboard's level box, ``--model``) and store the
typed value here; nothing here parses text back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..setting import AUTO_SETTING, MemorySetting

__all__ = ["SessionDefaults", "defaults", "default_model"]


@dataclass
class SessionDefaults:
    """Defaults for ``%%generate`` and the dashboard's Generate button.

    Attributes:
        model: the last model used (``MLNB_MODEL`` when unset).
        setting: the memory setting a generation uses when it names none: ``auto``, a level, or a VRAM budget for
            the budget planner (``%vram level 3.75GiB``), kept as the user gave it.
        verbose: the per-cell line also for cells that did not touch the GPU.
        monitor: per-cell monitoring on (``%vram on|off``).

    Example:
        ```python
        >>> from mlnb.session import defaults
        >>> from mlnb.setting import MemorySetting
        >>> defaults.setting = MemorySetting.parse("3.75GiB")
        ```
    """

    model: str | None = None
    setting: MemorySetting = AUTO_SETTING
    verbose: bool = False
    monitor: bool = True


defaults = SessionDefaults()


def default_model() -> str | None:
    """The model ``%%generate`` uses when none is named: the last one, else ``$MLNB_MODEL``."""
    return defaults.model or os.environ.get("MLNB_MODEL") or None
