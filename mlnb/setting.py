"""The memory setting: ``auto``, a level, a VRAM budget in bytes, or a config of techniques, as one value (pure).

A setting is parsed once, where it enters: a magic's ``--level``/``--vram``, ``%vram level``, the dashboard's level
box, ``load_pipeline``'s ``level``/``budget``/``config``. From there it travels as it is: into the session
defaults, the cache key, the :class:`~mlnb.ManagedPipeline` and the :class:`~mlnb.GenerationResult`. A budget keeps
its exact bytes for the planner and the user's number and unit for display (``3.75 GiB``, ``1500 MiB``), so it is
never formatted and parsed back.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .errors import InvalidArgumentError
from .levels import AUTO, MemoryOptimizationConfig, OptimizationLevel, parse_level
from .units import GiB, KiB, MiB, format_bytes, parse_bytes

__all__ = ["MemorySetting", "AUTO_SETTING", "SMALLEST_BUDGET"]

SMALLEST_BUDGET = 64 * MiB  # a budget typed below this lost its unit on the way ("4" is 4 bytes)

# The spelling shown for each unit parse_bytes reads.
_UNIT_NAMES = {
    "": "B", "b": "B",
    "k": "kB", "kb": "kB", "kib": "KiB",
    "m": "MB", "mb": "MB", "mib": "MiB",
    "g": "GB", "gb": "GB", "gib": "GiB",
    "t": "TB", "tb": "TB", "tib": "TiB",
}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*")


@dataclass(frozen=True)
class MemorySetting:
    """How a pipeline is fitted to GPU memory: ``auto``, a level, a VRAM budget, or a config of techniques.

    At most one of ``level``, ``budget`` and ``config`` is set; none is ``auto``. Build it with one of the
    class methods, which check what they are given; two settings are equal when they plan or place alike (a budget
    typed ``4GiB`` equals ``4096MiB``).

    Attributes:
        level: a fixed level.
        budget: a VRAM budget in bytes, for the budget planner.
        config: technique settings of the user's (their ``level`` is the level).
        shown: how the budget reads: the user's number and unit (``"3.75 GiB"``).

    Example:
        ```python
        >>> setting = MemorySetting.parse("3.75GiB")
        >>> setting.budget, str(setting)
        (4026531840, '3.75 GiB')
        >>> str(MemorySetting.parse("ultra")), MemorySetting.parse("auto").is_auto
        ('ultra', True)
        ```
    """

    level: OptimizationLevel | None = None
    budget: int | None = None
    config: MemoryOptimizationConfig | None = None
    shown: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        given = [name for name in ("level", "budget", "config") if getattr(self, name) is not None]
        if len(given) > 1:
            raise InvalidArgumentError(f"a memory setting is one of a level, a budget or a config, got {given}")
        if self.level is not None and not isinstance(self.level, OptimizationLevel):
            raise InvalidArgumentError(f"level must be an OptimizationLevel, got {type(self.level).__name__}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                                        or self.budget < 0):
            raise InvalidArgumentError(f"a budget is a whole number of bytes >= 0, got {self.budget!r}")
        if self.config is not None and not isinstance(self.config, MemoryOptimizationConfig):
            raise InvalidArgumentError(f"config must be a MemoryOptimizationConfig, got {type(self.config).__name__}")
        if self.budget is not None and self.shown is None:
            object.__setattr__(self, "shown", _exact_text(self.budget))

    # -- building ----------------------------------------------------------------------------------------------

    @classmethod
    def of_level(cls, level: str | OptimizationLevel | None) -> MemorySetting:
        """A fixed level; ``"auto"`` (or None) is :data:`AUTO_SETTING`.

        Raises:
            InvalidArgumentError: an unknown name, naming the accepted ones.
        """
        try:
            parsed = parse_level(level)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        return AUTO_SETTING if parsed is None else cls(level=parsed)

    @classmethod
    def of_budget(cls, size: str | int, typed: bool = False) -> MemorySetting:
        """A VRAM budget: bytes, or text such as ``"4GiB"``, ``"3.75 GiB"``, ``"1500MiB"``, shown as written.

        Args:
            size: bytes, or a size with its unit.
            typed: the user typed it (a magic option, ``%vram level``): a budget under 64 MiB is refused, since
                its unit was left out (``4`` is 4 bytes).

        Raises:
            InvalidArgumentError: text that is not a size, naming the accepted forms; a typed budget too small.
        """
        try:
            budget = parse_bytes(size)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        match = _SIZE.fullmatch(size) if isinstance(size, str) else None
        shown = None
        if match is not None:
            number, unit = match.groups()
            shown = f"{'0' if number.startswith('.') else ''}{number} {_UNIT_NAMES[unit.lower()]}"
        setting = cls(budget=budget, shown=shown)
        if typed and setting.budget < SMALLEST_BUDGET:
            raise InvalidArgumentError(f"a VRAM budget of {setting} holds no model; give a unit, such as 4GiB")
        return setting

    @classmethod
    def of_config(cls, config: MemoryOptimizationConfig) -> MemorySetting:
        """Technique settings of the user's.

        Raises:
            InvalidArgumentError: ``config`` is not a :class:`~mlnb.MemoryOptimizationConfig`.
        """
        return cls(config=config)

    @classmethod
    def parse(cls, text: str | OptimizationLevel) -> MemorySetting:
        """What ``%vram level`` and the dashboard's level box take: ``auto``, a level name, or a VRAM budget with its
        unit (``4GiB``).

        Raises:
            InvalidArgumentError: anything else, naming both forms; a budget under 64 MiB (a unit left out).
        """
        try:
            return cls.of_level(text)
        except InvalidArgumentError as exc:
            level_error = exc
        try:
            cls.of_budget(text)
        except InvalidArgumentError:
            raise InvalidArgumentError(f"{level_error}, or a VRAM budget such as 4GiB") from None
        return cls.of_budget(text, typed=True)

    @classmethod
    def from_arguments(cls, level: str | OptimizationLevel | None = AUTO, budget: str | int | None = None,
                       config: MemoryOptimizationConfig | None = None) -> MemorySetting:
        """``load_pipeline``'s ``level``, ``budget`` and ``config`` as one setting: a budget replaces the level; a
        config sets the level, and another level beside it is refused.

        Raises:
            InvalidArgumentError: naming the argument and the rule it broke.
        """
        if config is not None and not isinstance(config, MemoryOptimizationConfig):
            raise InvalidArgumentError(f"config must be a MemoryOptimizationConfig, got {type(config).__name__}")
        asked = cls.of_level(level)
        if config is not None and asked.level is not None and asked.level is not config.level:
            raise InvalidArgumentError(
                f"level {asked.level.value!r} and a config of level {config.level.value!r}: the config sets the level, "
                "give one"
            )
        if budget is not None:
            if config is not None:
                raise InvalidArgumentError("budget and config: the planner chooses the techniques for a budget, give one")
            try:
                return cls.of_budget(budget)
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"budget: {exc}") from None
        return cls.of_config(config) if config is not None else asked

    # -- reading -----------------------------------------------------------------------------------------------

    @property
    def is_auto(self) -> bool:
        """Chosen when a model loads: on a CUDA card a plan for the free memory, elsewhere the level table."""
        return self.level is None and self.budget is None and self.config is None

    @property
    def kind(self) -> str:
        """``"level"`` (``auto`` too), ``"budget"`` or ``"config"``: what a message calls it."""
        return "budget" if self.budget is not None else "config" if self.config is not None else "level"

    @property
    def techniques(self) -> MemoryOptimizationConfig | None:
        """The technique settings a fixed level or a config places a pipeline with; None for auto and a budget."""
        if self.config is not None:
            return self.config
        return MemoryOptimizationConfig.from_level(self.level) if self.level is not None else None

    @property
    def key(self) -> str:
        """The cache key's part for this setting: exact bytes for a budget (two budgets shown alike are two plans,
        and the larger must not serve the smaller), the level and the settings that differ from the level's own
        for a config (a level and its own config are one entry)."""
        if self.budget is not None:
            return f"budget {self.budget} B"
        techniques = self.techniques
        if techniques is None:
            return AUTO
        own = MemoryOptimizationConfig.from_level(techniques.level)
        changed = [f"{f.name}={getattr(techniques, f.name)!r}" for f in dataclasses.fields(techniques)
                   if getattr(techniques, f.name) != getattr(own, f.name)]
        return techniques.level.value + (f" ({', '.join(changed)})" if changed else "")

    def show_budget(self, budget: int) -> str:
        """``budget`` bytes as a message shows them: this setting's own text when it is this budget, else rounded."""
        return self.shown if budget == self.budget else format_bytes(budget)

    def __str__(self) -> str:
        """``auto``, ``ultra``, ``3.75 GiB`` (as the user wrote it), or a config's level and its changes."""
        return self.shown if self.budget is not None else self.key


AUTO_SETTING = MemorySetting()


def _exact_text(budget: int) -> str:
    """Bytes as the shortest exact size (``4026531840`` -> ``3.75 GiB``), or rounded when no short form is exact."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if budget >= unit and budget * 100 % unit == 0:
            return f"{budget / unit:.2f}".rstrip("0").rstrip(".") + f" {name}"
    return format_bytes(budget)

