"""Pure level logic: level -> techniques, free VRAM -> level, parsing, tile size and activation reserve."""

from __future__ import annotations

import dataclasses
import re

import pytest

from mlnb.levels import (
    LEVEL_NAMES,
    LevelChoice,
    MemoryOptimizationConfig,
    OptimizationLevel,
    Technique,
    activation_reserve,
    choose_level,
    choose_vae_tile,
    parse_level,
    stronger_level,
)
from mlnb.units import GB, GiB

L = OptimizationLevel
CLEANUP = {"gc_collect", "cuda_cache_clear"}
ATTENTION = {"attention_slicing", "xformers", "forward_chunking"}
VAE = {"vae_tiling", "vae_slicing"}

EXPECTED = {
    L.NONE: CLEANUP,
    L.BALANCED: {"model_cpu_offload", "vae_tiling", "xformers"} | CLEANUP,
    L.AGGRESSIVE: {"group_offload"} | VAE | ATTENTION | CLEANUP,
    L.ULTRA: {"group_offload", "fp8_storage"} | VAE | ATTENTION | CLEANUP,
}


# ---------------------------------------------------------------------------------------------------------------
# Levels -> techniques


def test_there_are_eleven_techniques_and_each_is_a_config_field():
    """The seed names eleven techniques; the config has one boolean field per technique."""
    assert len(Technique) == 11
    fields = {f.name: f for f in dataclasses.fields(MemoryOptimizationConfig)}
    for tech in Technique:
        assert fields[tech.value].type in ("bool", bool)


@pytest.mark.parametrize("level", list(L))
def test_from_level_enables_exactly_the_seeds_techniques(level):
    """Each level turns on exactly the techniques the seed lists for it, nothing more."""
    config = MemoryOptimizationConfig.from_level(level)
    assert config.level is level
    assert set(config.enabled()) == EXPECTED[level]
    # enabled() lists them in Technique order
    order = [t.value for t in Technique]
    assert config.enabled() == sorted(config.enabled(), key=order.index)


def test_group_offload_mode_per_level():
    """Aggressive uses leaf-level groups without a stream (no pinned copy); ultra adds the stream."""
    aggressive = MemoryOptimizationConfig.from_level("aggressive")
    ultra = MemoryOptimizationConfig.from_level("ultra")
    assert (aggressive.group_offload_type, aggressive.group_offload_use_stream) == ("leaf_level", False)
    assert (ultra.group_offload_type, ultra.group_offload_use_stream) == ("leaf_level", True)
    assert not MemoryOptimizationConfig.from_level("balanced").group_offload_use_stream


def test_from_level_accepts_names_members_and_overrides():
    """A name in any case equals the member; keyword overrides change single techniques."""
    assert MemoryOptimizationConfig.from_level(" ULTRA ") == MemoryOptimizationConfig.from_level(L.ULTRA)
    config = MemoryOptimizationConfig.from_level("balanced", vae_tile_size=256, xformers=False)
    assert config.vae_tile_size == 256
    assert "xformers" not in config.enabled()
    assert config.model_cpu_offload


def test_from_level_refuses_auto():
    """``auto`` must be resolved by ``choose_level`` first; the message says so."""
    with pytest.raises(ValueError, match="choose_level"):
        MemoryOptimizationConfig.from_level("auto")


@pytest.mark.parametrize(
    "a, b",
    [
        ("model_cpu_offload", "sequential_cpu_offload"),
        ("model_cpu_offload", "group_offload"),
        ("sequential_cpu_offload", "group_offload"),
    ],
)
def test_conflicting_offloads_raise_naming_both_fields(a, b):
    """Two offloads on one config is a conflict; the error names both fields."""
    with pytest.raises(ValueError) as info:
        MemoryOptimizationConfig(**{a: True, b: True})
    assert f"`{a}`" in str(info.value) and f"`{b}`" in str(info.value)


def test_override_that_adds_a_second_offload_is_refused():
    """Overriding balanced (model offload) with group offload is caught at construction."""
    with pytest.raises(ValueError, match="model_cpu_offload.*group_offload"):
        MemoryOptimizationConfig.from_level("balanced", group_offload=True)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(group_offload=True, group_offload_type="module_level"), "group_offload_type"),
        (dict(group_offload_use_stream=True), "group_offload_use_stream"),
        (dict(vae_tiling=True, vae_tile_size=32), "vae_tile_size"),
        (dict(vae_tiling=True, vae_tile_size=100), "vae_tile_size"),
    ],
)
def test_out_of_range_settings_name_the_field(kwargs, field):
    """Each rule a setting breaks is reported with the field's name."""
    with pytest.raises(ValueError, match=f"`{field}`"):
        MemoryOptimizationConfig(**kwargs)


def test_config_is_frozen_and_replace_revalidates():
    """The config cannot be mutated; ``replace`` builds a new one and checks it again."""
    config = MemoryOptimizationConfig.from_level("none")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.vae_tiling = True  # type: ignore[misc]
    assert config.replace(vae_tiling=True).vae_tiling
    with pytest.raises(ValueError):
        config.replace(model_cpu_offload=True, sequential_cpu_offload=True)


# ---------------------------------------------------------------------------------------------------------------
# parse_level / stronger_level


@pytest.mark.parametrize("value", ["auto", "AUTO", " auto ", None])
def test_parse_level_auto_is_none(value):
    """``auto`` (or nothing) means: choose later."""
    assert parse_level(value) is None


@pytest.mark.parametrize("value, level", [("none", L.NONE), ("Balanced", L.BALANCED), (" aggressive", L.AGGRESSIVE), (L.ULTRA, L.ULTRA)])
def test_parse_level_accepts_names_and_members(value, level):
    """Names in any case with spaces, and members themselves."""
    assert parse_level(value) is level


@pytest.mark.parametrize("value", ["max", "", "ultra+", 3])
def test_parse_level_rejects_others_with_the_accepted_names(value):
    """An unknown level names the value and lists every accepted name."""
    with pytest.raises(ValueError) as info:
        parse_level(value)
    message = str(info.value)
    assert repr(value) in message
    for name in ("auto", "none", "balanced", "aggressive", "ultra"):
        assert name in message
    assert LEVEL_NAMES == ["auto", "none", "balanced", "aggressive", "ultra"]


def test_level_is_a_str_enum():
    """Levels compare equal to their names and print as them."""
    assert L.ULTRA == "ultra"
    assert str(L.BALANCED) == "balanced"
    assert f"{L.NONE}" == "none"


def test_stronger_level_walks_up_to_ultra():
    """Each level's next stronger one, and nothing after ultra."""
    assert stronger_level(L.NONE) is L.BALANCED
    assert stronger_level(L.BALANCED) is L.AGGRESSIVE
    assert stronger_level(L.AGGRESSIVE) is L.ULTRA
    assert stronger_level(L.ULTRA) is None


# ---------------------------------------------------------------------------------------------------------------
# choose_level


@pytest.mark.parametrize(
    "free, level, fragment",
    [
        (2 * GB, L.ULTRA, "< 6 GB"),
        (4 * GiB, L.ULTRA, "< 6 GB"),
        (6 * GB - 1, L.ULTRA, "< 6 GB"),
        (6 * GB, L.AGGRESSIVE, "6-8 GB"),
        (7 * GB, L.AGGRESSIVE, "6-8 GB"),
        (8 * GB - 1, L.AGGRESSIVE, "6-8 GB"),
        (8 * GB, L.BALANCED, "8-12 GB"),
        (10 * GB, L.BALANCED, "8-12 GB"),
        (12 * GB - 1, L.BALANCED, "8-12 GB"),
        (12 * GB, L.BALANCED, "model size unknown"),
        (80 * GB, L.BALANCED, "model size unknown"),
    ],
)
def test_choose_level_follows_the_table_including_boundaries(free, level, fragment):
    """Under 6 GB ultra, 6-8 aggressive, 8-12 balanced (decimal GB, as cards are sold); above 12 balanced
    while the model's size is unknown. The reason states the free memory and the band."""
    choice = choose_level(free)
    assert isinstance(choice, LevelChoice)
    assert choice.level is level
    assert fragment in choice.reason
    assert "free" in choice.reason
    assert choice.auto


def test_choose_level_above_12gb_picks_none_when_model_and_reserve_fit():
    """Above 12 GB, NONE when weights + activations fit with a 10% margin, else BALANCED; the reason says which."""
    free = 15 * GiB  # a Colab T4
    fits = choose_level(free, model_bytes=2 * GiB, reserve_bytes=1 * GiB)
    assert fits.level is L.NONE
    assert "fit" in fits.reason and "do not" not in fits.reason
    too_big = choose_level(free, model_bytes=13 * GiB, reserve_bytes=1 * GiB)
    assert too_big.level is L.BALANCED
    assert "do not fit" in too_big.reason


def test_choose_level_margin_boundary():
    """The need must be at most 90% of free memory: exactly 90% fits, one byte more does not."""
    free = 20 * GB
    reserve = 1 * GB
    model = int(0.9 * free) - reserve
    assert choose_level(free, model_bytes=model, reserve_bytes=reserve).level is L.NONE
    assert choose_level(free, model_bytes=model + 1, reserve_bytes=reserve).level is L.BALANCED


def test_choose_level_uses_the_default_reserve_when_none_given():
    """Without a reserve, the 1024² activation reserve is kept free."""
    free = 13 * GB
    reserve = activation_reserve()
    room = int(0.9 * free)
    assert choose_level(free, model_bytes=room - reserve).level is L.NONE
    assert choose_level(free, model_bytes=room - reserve + 1).level is L.BALANCED


def test_choose_level_never_picks_none_below_12gb_even_if_it_fits():
    """The table rules below 12 GB: a tiny model on a 10 GB card is still BALANCED."""
    assert choose_level(10 * GB, model_bytes=1, reserve_bytes=1).level is L.BALANCED


def test_choose_level_without_gpu():
    """No free-memory figure means no CUDA device: NONE, and the reason says so."""
    choice = choose_level(None)
    assert choice.level is L.NONE
    assert "CUDA" in choice.reason
    assert str(choice).startswith("none (")


# ---------------------------------------------------------------------------------------------------------------
# choose_vae_tile / activation_reserve


@pytest.mark.parametrize(
    "free, sample_size, level, tile",
    [
        (None, 1024, L.BALANCED, 768),  # SDXL VAE: 1024 would not tile a 1024² image
        (10 * GB, 1024, L.BALANCED, 768),
        (7 * GB, 1024, L.BALANCED, 512),  # under 8 GB free
        (None, 1024, L.AGGRESSIVE, 512),
        (None, 1024, L.ULTRA, 512),
        (None, 512, L.BALANCED, 512),  # never above the VAE's own sample size
        (None, 64, L.ULTRA, 64),
        (None, 36, L.ULTRA, 64),  # never below 64
        (None, 300, L.BALANCED, 296),  # a multiple of 8
        (None, None, L.BALANCED, 768),
    ],
)
def test_choose_vae_tile(free, sample_size, level, tile):
    """512 px at aggressive/ultra or under 8 GB free, else 768, capped at the VAE's size, multiple of 8, >= 64."""
    assert choose_vae_tile(free, sample_size, level) == tile


def test_activation_reserve_matches_the_measured_figures_and_scales():
    """SD1.5's 0.67 GiB is the floor; SDXL 1024² is 0.76 GiB; it scales with pixels and batch; an fp32 VAE adds
    4.3 GiB per megapixel."""
    assert activation_reserve(512, 512) == int(0.67 * GiB)
    assert activation_reserve(64, 64) == int(0.67 * GiB)
    assert activation_reserve(1024, 1024) == int(0.76 * GiB)
    assert activation_reserve(1024, 1024, batch=2) == int(2 * 0.76 * GiB)
    assert activation_reserve(2048, 1024) == int(2 * 0.76 * GiB)
    assert activation_reserve(1024, 1024, vae_fp32=True) == int(0.76 * GiB + 4.3 * GiB)
    assert activation_reserve(1024, 1024, vae_fp32=True) > activation_reserve(1024, 1024)


def test_describe_auto_says_plan_on_cuda_and_the_table_elsewhere():
    from mlnb.levels import describe_auto

    assert describe_auto(None, plans=False) == str(choose_level(None))
    assert describe_auto(4 * GB, plans=False).startswith("ultra")
    text = describe_auto(4 * GB, plans=True)
    assert text.startswith("plan for the free VRAM when a model loads (3.7 GiB now") and "table without a model: ultra" in text


@pytest.mark.parametrize("overrides, message", [
    (dict(level="turbo"), "unknown level 'turbo'"),
    (dict(level=None), "`level` must be one of"),
    (dict(level="auto"), "`level` must be one of"),
    (dict(vae_tiling="no"), "`vae_tiling` must be True or False, got 'no'"),
    (dict(gc_collect=1), "`gc_collect` must be True or False, got 1"),
    (dict(vae_tile_size="512"), "`vae_tile_size` must be a whole number of pixels or None, got '512'"),
    (dict(vae_tile_size=64.0), "`vae_tile_size` must be a whole number of pixels"),
])
def test_config_fields_are_checked_when_it_is_made(overrides, message):
    from mlnb.levels import MemoryOptimizationConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        MemoryOptimizationConfig(**overrides)


def test_a_config_takes_a_level_by_name_as_everywhere_else():
    from mlnb.levels import MemoryOptimizationConfig, OptimizationLevel

    assert MemoryOptimizationConfig(level=" Balanced ").level is OptimizationLevel.BALANCED
