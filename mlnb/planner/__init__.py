"""The budget planner: a VRAM budget in, a placement of the pipeline's weights out, applied, and improved by what
each generation measures.

- :mod:`.cost` and :mod:`.search`: the cost model and the placement search (pure; no torch);
- :mod:`.cards`, :mod:`.blocks` and :mod:`.models`: the facts a plan is made from, measured on the card and read off
  the model (its units in the order they run, its native size);
- :mod:`.apply`, :mod:`.streaming`, :mod:`.decode_room`, :mod:`.pinning` and :mod:`.host_memory`: a plan applied to
  a pipeline (resident parts placed, the rest streamed from packed pinned copies, kept blocks out of the decode's
  way, host memory given back as it goes);
- :mod:`.timing` and :mod:`.learning`: what a generation measures, and what the card facts learn from it.

Example:
    ```python
    >>> from mlnb.planner import Workload, model_facts, plan_for_budget
    >>> print(plan_for_budget(4 * 2**30, model_facts(pipe), work=Workload(1024, 1024)))
    ```
"""

from .apply import apply_plan, plan_level
from .blocks import denoiser_blocks, model_facts, model_key
from .cards import card_facts, describe_card, record_measured
from .cost import (
    Block,
    CardFacts,
    ModelFacts,
    Plan,
    Workload,
    overlap_measured,
    predict,
    room_needed,
    schedule_step,
    streamed_step,
)
from .learning import LearningContext
from .models import native_size
from .search import BudgetError, plan_for_budget
from .streaming import UnitStreamer, module_streamer, stream_units, streamer_of, streamers_of
from .timing import BlockTimer, StepTimer, cache_was_empty

__all__ = [
    "Block", "CardFacts", "ModelFacts", "Plan", "Workload", "BudgetError", "plan_for_budget", "predict",
    "room_needed", "schedule_step", "streamed_step", "overlap_measured",
    "card_facts", "record_measured", "describe_card", "model_facts", "model_key", "denoiser_blocks", "native_size",
    "apply_plan", "plan_level", "UnitStreamer", "stream_units", "streamer_of", "streamers_of", "module_streamer",
    "StepTimer", "BlockTimer", "cache_was_empty", "LearningContext",
]
