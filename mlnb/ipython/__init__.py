"""The IPython extension: ``%load_ext mlnb`` registers the magics and the per-cell hooks; unload removes exactly those.

Load and unload mirror each other: the extension keeps the bound callbacks and the magics it registered on the
shell, and removes those same objects, so ``%reload_ext mlnb`` never stacks hooks.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = ["load_ipython_extension", "unload_ipython_extension", "banner"]

_STATE_ATTR = "_mlnb_extension"


@dataclass
class _Extension:
    cell_monitor: object
    magics: object
    callbacks: tuple[tuple[str, object], ...]


def banner() -> str:
    """The one line printed on load: version, device, VRAM free/total, the level auto would pick."""
    from ..version import __version__
    from ..device import get_device
    from ..levels import describe_auto
    from ..units import format_bytes

    info = get_device().info()
    if info.available:
        where = f"{info.name} · VRAM {format_bytes(info.free_bytes)} free / {format_bytes(info.total_bytes)}"
    else:
        where = info.name
    return f"mlnb {__version__} · {where} · auto level {describe_auto(info.free_bytes, info.kind == 'cuda')}"


def load_ipython_extension(ipython) -> None:
    from .. import notices
    from .cell_monitor import CellMonitor
    from .magics import MlnbMagics

    notices.install()
    if getattr(ipython, _STATE_ATTR, None) is not None:
        unload_ipython_extension(ipython)
    monitor = CellMonitor(ipython)
    magics = MlnbMagics(ipython)
    callbacks = (("pre_run_cell", monitor.pre_run_cell), ("post_run_cell", monitor.post_run_cell))
    for event, callback in callbacks:
        ipython.events.register(event, callback)
    ipython.register_magics(magics)
    setattr(ipython, _STATE_ATTR, _Extension(monitor, magics, callbacks))
    print(banner())


def unload_ipython_extension(ipython) -> None:
    state = getattr(ipython, _STATE_ATTR, None)
    if state is None:
        return
    for event, callback in state.callbacks:
        try:
            ipython.events.unregister(event, callback)
        except ValueError:  # already gone
            pass
    state.cell_monitor.close()
    table = ipython.magics_manager.magics
    for kind, names in state.magics.magics.items():
        for name in names:
            table.get(kind, {}).pop(name, None)
    ipython.magics_manager.registry.pop(type(state.magics).__name__, None)
    if "mlnb.widgets" in sys.modules:  # only close dashboards that exist; never import ipywidgets here
        try:
            sys.modules["mlnb.widgets"].close_all()
        except Exception as exc:
            logger.debug("closing dashboards failed: %s", exc)
    setattr(ipython, _STATE_ATTR, None)
