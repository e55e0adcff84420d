"""The notebook session: the state the magics and the dashboard share, and the one generation use case they call.

- :mod:`.defaults`: the remembered model and the memory setting for generations that name none.
- :mod:`.generate`: :func:`generate_images`, resolve the defaults, load, remember, generate with the OOM rescue.
- :mod:`.status`: what ``%vram`` shows, and freeing memory.

Nothing here prints; the UI layers render the result objects.
"""

from .defaults import SessionDefaults, default_model, defaults
from .generate import generate_images, resolve
from .status import FreeReport, PipelineStatus, Status, free_memory, memory_rows, status

__all__ = [
    "SessionDefaults", "defaults", "default_model", "generate_images", "resolve", "Status", "PipelineStatus",
    "status", "FreeReport", "free_memory", "memory_rows",
]
