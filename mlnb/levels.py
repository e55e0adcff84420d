"""Optimization levels, the per-technique config, and the automatic level choice. Pure: no torch here.

The four levels follow the seed:

- ``none``: nothing but cleanup.
- ``balanced``: model CPU offload, VAE tiling, efficient attention (xformers when it works, otherwise SDPA).
- ``aggressive``: group offloading at leaf level without streams (no pinned host copy; sequential offload is the
  fallback where group offloading is missing), VAE tiling and slicing, every attention saving; no fp8.
- ``ultra``: group offloading at leaf level with CUDA streams, fp8 weight storage, and everything else.

``auto`` picks one from free VRAM (decimal GB, as cards are sold): under 6 GB ultra, 6-8 aggressive, 8-12 balanced,
above 12 balanced, or none when the whole model and its activations fit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

from .units import GB, GiB, format_bytes

__all__ = [
    "AUTO",
    "OptimizationLevel",
    "Technique",
    "MemoryOptimizationConfig",
    "LevelChoice",
    "parse_level",
    "choose_level",
    "stronger_level",
    "activation_reserve",
    "choose_vae_tile",
    "describe_auto",
]

AUTO = "auto"


class OptimizationLevel(str, Enum):
    """How hard mlnb works to save GPU memory. ``"auto"`` is accepted wherever a level is."""

    NONE = "none"
    BALANCED = "balanced"
    AGGRESSIVE = "aggressive"
    ULTRA = "ultra"

    def __str__(self) -> str:
        return self.value


_ORDER = [OptimizationLevel.NONE, OptimizationLevel.BALANCED, OptimizationLevel.AGGRESSIVE, OptimizationLevel.ULTRA]
LEVEL_NAMES = [AUTO] + [level.value for level in _ORDER]


class Technique(str, Enum):
    """The eleven techniques. Each is applied for real or reported skipped with a reason."""

    MODEL_CPU_OFFLOAD = "model_cpu_offload"
    SEQUENTIAL_CPU_OFFLOAD = "sequential_cpu_offload"
    GROUP_OFFLOAD = "group_offload"
    VAE_TILING = "vae_tiling"
    VAE_SLICING = "vae_slicing"
    FP8_STORAGE = "fp8_storage"
    ATTENTION_SLICING = "attention_slicing"
    XFORMERS = "xformers"
    FORWARD_CHUNKING = "forward_chunking"
    GC_COLLECT = "gc_collect"
    CUDA_CACHE_CLEAR = "cuda_cache_clear"

    def __str__(self) -> str:
        return self.value


def parse_level(level: str | OptimizationLevel | None) -> OptimizationLevel | None:
    """``"auto"``/``None`` -> ``None`` (choose later); a name or member -> the member.

    Raises:
        ValueError: naming the value and the accepted names.
    """
    if level is None or (isinstance(level, str) and level.strip().lower() == AUTO):
        return None
    if isinstance(level, OptimizationLevel):
        return level
    try:
        return OptimizationLevel(str(level).strip().lower())
    except ValueError:
        raise ValueError(f"unknown level {level!r}: use one of {', '.join(LEVEL_NAMES)}") from None


def stronger_level(level: OptimizationLevel) -> OptimizationLevel | None:
    """The next level that saves more memory, or ``None`` after ultra."""
    index = _ORDER.index(level)
    return _ORDER[index + 1] if index + 1 < len(_ORDER) else None


_OFFLOADS = ("model_cpu_offload", "sequential_cpu_offload", "group_offload")


@dataclass(frozen=True)
class MemoryOptimizationConfig:
    """One field per technique, plus the level it came from.

    Args:
        level: the level these settings belong to.
        model_cpu_offload: whole components move to the GPU when used (accelerate hooks via diffusers).
        sequential_cpu_offload: every leaf module is streamed to the GPU for its forward.
        group_offload: diffusers group offloading; see ``group_offload_type`` and ``group_offload_use_stream``.
        group_offload_type: ``"leaf_level"`` or ``"block_level"``.
        group_offload_use_stream: prefetch the next group on a CUDA stream (pins host memory).
        vae_tiling: decode in tiles of ``vae_tile_size`` pixels (``None``: chosen for the budget).
        vae_slicing: decode a batch one image at a time.
        fp8_storage: store denoiser weights in fp8, compute in fp16/bf16 (diffusers layerwise casting).
        attention_slicing: sliced attention (only when neither SDPA nor xformers is in use: under SDPA it only slows).
        xformers: memory-efficient attention from xformers, when it imports and runs.
        forward_chunking: feed-forward chunking, on models that implement it.
        gc_collect: ``gc.collect()`` at each cleanup phase.
        cuda_cache_clear: synchronize, ``empty_cache`` and ``ipc_collect`` at each cleanup phase.

    Raises:
        ValueError: when two offloads are on, or a setting is out of range; the message names both fields.

    Example:
        ```python
        >>> from mlnb import MemoryOptimizationConfig
        >>> MemoryOptimizationConfig.from_level("ultra").enabled()
        ['group_offload', 'vae_tiling', 'vae_slicing', 'fp8_storage', ...]
        ```
    """

    level: OptimizationLevel = OptimizationLevel.NONE
    model_cpu_offload: bool = False
    sequential_cpu_offload: bool = False
    group_offload: bool = False
    group_offload_type: str = "leaf_level"
    group_offload_use_stream: bool = False
    vae_tiling: bool = False
    vae_tile_size: int | None = None
    vae_slicing: bool = False
    fp8_storage: bool = False
    attention_slicing: bool = False
    xformers: bool = False
    forward_chunking: bool = False
    gc_collect: bool = True
    cuda_cache_clear: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.level, OptimizationLevel):  # a name, as everywhere a level is taken
            member = parse_level(self.level) if isinstance(self.level, str) else None
            if member is None:
                raise ValueError(f"`level` must be one of {', '.join(LEVEL_NAMES)}, got {self.level!r}")
            object.__setattr__(self, "level", member)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"`{f.name}` must be True or False, got {value!r}")
        if self.vae_tile_size is not None and (isinstance(self.vae_tile_size, bool)
                                               or not isinstance(self.vae_tile_size, int)):
            raise ValueError(f"`vae_tile_size` must be a whole number of pixels or None, got {self.vae_tile_size!r}")
        on = [name for name in _OFFLOADS if getattr(self, name)]
        if len(on) > 1:
            raise ValueError(f"`{on[0]}` and `{on[1]}` cannot both be True: a component can have one offload only")
        if self.group_offload_type not in ("leaf_level", "block_level"):
            raise ValueError(f"`group_offload_type` must be 'leaf_level' or 'block_level', got {self.group_offload_type!r}")
        if self.group_offload_use_stream and not self.group_offload:
            raise ValueError("`group_offload_use_stream` cannot be True when `group_offload=False`")
        if self.vae_tile_size is not None and (self.vae_tile_size < 64 or self.vae_tile_size % 8):
            raise ValueError(f"`vae_tile_size` must be a multiple of 8 and at least 64, got {self.vae_tile_size}")

    @classmethod
    def from_level(cls, level: str | OptimizationLevel, **overrides) -> "MemoryOptimizationConfig":
        """The seed's settings for ``level``; keyword overrides change single techniques.

        ``"auto"`` is not a level of its own here: resolve it first with :func:`choose_level`.
        """
        parsed = parse_level(level)
        if parsed is None:
            raise ValueError("`from_level` needs a concrete level; resolve 'auto' with mlnb.levels.choose_level first")
        base: dict = {"level": parsed}
        if parsed is OptimizationLevel.BALANCED:
            base.update(model_cpu_offload=True, vae_tiling=True, xformers=True)
        elif parsed is OptimizationLevel.AGGRESSIVE:
            base.update(
                group_offload=True, group_offload_type="leaf_level", group_offload_use_stream=False,
                vae_tiling=True, vae_slicing=True, attention_slicing=True, xformers=True, forward_chunking=True,
            )
        elif parsed is OptimizationLevel.ULTRA:
            base.update(
                group_offload=True, group_offload_type="leaf_level", group_offload_use_stream=True,
                vae_tiling=True, vae_slicing=True, fp8_storage=True,
                attention_slicing=True, xformers=True, forward_chunking=True,
            )
        base.update(overrides)
        return cls(**base)

    def enabled(self) -> list[str]:
        """Names of the techniques this config asks for, in :class:`Technique` order."""
        return [t.value for t in Technique if getattr(self, t.value)]

    def replace(self, **changes) -> "MemoryOptimizationConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class LevelChoice:
    """A level and why it was picked."""

    level: OptimizationLevel
    reason: str
    auto: bool = True

    def __str__(self) -> str:
        return f"{self.level.value} ({self.reason})"


def activation_reserve(width: int = 1024, height: int = 1024, batch: int = 1, vae_fp32: bool = False) -> int:
    """Bytes to keep free beyond the weights for one generation with everything resident.

    The anchors are plain diffusers' peaks above the weights (fp16, classifier-free guidance; the measurements are in
    docs/benchmarks.md): 0.67 GiB for SD1.5 at 512², 0.76 GiB for SDXL at 1024² with an fp16 VAE, and 4.3 GiB more
    for an fp32 (upcast) VAE decode at 1024². Scales with pixels and batch; never below the SD1.5 figure.
    """
    pixels = width * height * batch / (1024 * 1024)
    reserve = max(0.67 * GiB, 0.76 * GiB * pixels)
    if vae_fp32:
        reserve += 4.3 * GiB * pixels
    return int(reserve)


def choose_level(
    free_bytes: int | None,
    model_bytes: int | None = None,
    reserve_bytes: int | None = None,
) -> LevelChoice:
    """Pick a level from free VRAM (pure).

    Args:
        free_bytes: free device memory, ``None`` without a GPU.
        model_bytes: the pipeline's weights in their runtime dtype, when known.
        reserve_bytes: activations to keep room for (see :func:`activation_reserve`).

    Example:
        ```python
        >>> choose_level(4 * 10**9).level
        <OptimizationLevel.ULTRA: 'ultra'>
        ```
    """
    if free_bytes is None:
        return LevelChoice(OptimizationLevel.NONE, "no CUDA device: runs on the CPU, nothing to offload to")
    free = format_bytes(free_bytes)
    if free_bytes < 6 * GB:
        return LevelChoice(OptimizationLevel.ULTRA, f"{free} free < 6 GB")
    if free_bytes < 8 * GB:
        return LevelChoice(OptimizationLevel.AGGRESSIVE, f"{free} free, 6-8 GB")
    if free_bytes < 12 * GB:
        return LevelChoice(OptimizationLevel.BALANCED, f"{free} free, 8-12 GB")
    if model_bytes is not None:
        reserve = reserve_bytes if reserve_bytes is not None else activation_reserve()
        need = model_bytes + reserve
        # Keep a 10% margin for the allocator's fragmentation.
        if need <= 0.9 * free_bytes:
            return LevelChoice(
                OptimizationLevel.NONE,
                f"{free} free > 12 GB; weights {format_bytes(model_bytes)} + activations {format_bytes(reserve)} fit",
            )
        return LevelChoice(
            OptimizationLevel.BALANCED,
            f"{free} free > 12 GB but weights {format_bytes(model_bytes)} + activations {format_bytes(reserve)} do not fit",
        )
    return LevelChoice(OptimizationLevel.BALANCED, f"{free} free > 12 GB (model size unknown)")


def choose_vae_tile(free_bytes: int | None, vae_sample_size: int | None, level: OptimizationLevel) -> int:
    """Tile size in pixels for VAE tiling, chosen for the budget.

    ``vae.enable_tiling()`` alone tiles at ``config.sample_size`` (1024 for SDXL), which does nothing for a 1024²
    image; so the tile is set explicitly: 512 px at aggressive/ultra or under 8 GB free, 768 px otherwise, never
    above the VAE's own sample size.
    """
    tile = 512 if level in (OptimizationLevel.AGGRESSIVE, OptimizationLevel.ULTRA) else 768
    if free_bytes is not None and free_bytes < 8 * GB:
        tile = 512
    if vae_sample_size:
        tile = min(tile, int(vae_sample_size))
    return max(64, tile - tile % 8)


def describe_auto(free_bytes: int | None, plans: bool) -> str:
    """What ``auto`` does on this device, for the banner, ``mlnb doctor`` and ``%vram``.

    Args:
        free_bytes: free VRAM now (``None`` without a GPU).
        plans: the device is a CUDA card, where ``auto`` is the budget planner for the memory free when a model loads;
            elsewhere it is :func:`choose_level`'s table.
    """
    choice = choose_level(free_bytes)
    if not plans:
        return str(choice)
    return f"plan for the free VRAM when a model loads ({format_bytes(free_bytes)} now; table without a model: {choice.level.value})"

