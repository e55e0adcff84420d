# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Real models on a Colab T4 and on a 4 GB card
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mlnb-project/mlnb/blob/main/notebooks/05_colab_t4_and_4gb.ipynb)
#
# Stable Diffusion 1.5 and SDXL with the level and settings that fit a free Colab T4 (15 GiB of VRAM, 12.7 GB of
# host RAM) and a 4 GB card. On Colab choose *Runtime → Change runtime type → T4 GPU* first.
#
# The cells that download and run the real models need a CUDA GPU. Without one they are skipped, each with a line
# that says so; everything else runs on the embedded tiny model.

# %%
# Parameters: set MLNB_MODEL to a hub id or a local diffusers folder for a real model.
import os
import sys

if "google.colab" in sys.modules:  # Colab has torch and diffusers already: add mlnb
    # %pip install -q mlnb

import mlnb

MODEL = os.environ.get("MLNB_MODEL") or str(mlnb.testing.default_tiny_model())
TINY = not os.environ.get("MLNB_MODEL")
SIZE = 64 if TINY else 512  # pixels; 512 suits SD1.5, use 1024 for SDXL
STEPS = 2 if TINY else 30

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
PROMPT = "a watercolor fox in a snowy forest"

# %%
# %load_ext mlnb

# %%
from mlnb.device import get_device

GPU = get_device().is_cuda
if GPU:
    info = get_device().info()
    print(f"GPU: {info.name}; the real-model cells below run")
else:
    print("no CUDA GPU: the real-model cells below are skipped (each says so); the tiny model runs on the CPU")

# %% [markdown]
# ## What `auto` picks, and why
#
# `auto` decides from free VRAM and the model's weight size plus the activations of one image at its native size
# (SD1.5 512², SDXL 1024²; SDXL's VAE decodes in fp32 because its config says `force_upcast`). The weight sizes
# below are computed from the public checkpoints' parameter counts at 2 bytes per parameter (fp16; a T4 has no
# bf16). The choices are mlnb's rule applied to those sizes, **computed here, not measured**; they assume the whole
# card is free.

# %%
from mlnb import choose_level
from mlnb.levels import activation_reserve
from mlnb.units import GiB, format_bytes

PARAMS = {  # unet + vae + text encoder(s), from the public configs
    "SD1.5": 859_520_964 + 83_653_863 + 123_060_480,
    "SDXL": 2_567_463_684 + 83_653_863 + 123_060_480 + 694_659_840,
}
NATIVE = {"SD1.5": 512, "SDXL": 1024}
for card, free in [("T4, 15 GiB", 15 * GiB), ("4 GiB card", 4 * GiB)]:
    for name, params in PARAMS.items():
        side = NATIVE[name]
        reserve = activation_reserve(side, side, vae_fp32=(name == "SDXL"))
        print(f"{card:<11} {name:<6} fp16 weights {format_bytes(2 * params)}: {choose_level(free, 2 * params, reserve)}")

# %% [markdown]
# ## The settings
#
# | | Colab T4: 15 GiB VRAM, 12.7 GB RAM | 4 GB card |
# |---|---|---|
# | SD1.5, 512², 30 steps | `auto` → `none`: everything on the GPU | `auto` → `ultra`: group offload with streams, fp8 storage, VAE tiles |
# | SDXL, 1024², 30 steps | `auto` → `none`; `balanced` (model offload) when other work shares the card | `ultra` if the host has the RAM for the pinned copy, else `aggressive` |
#
# Two things decide beyond VRAM:
#
# - **Host RAM.** Group offloading with streams (`ultra`) keeps the offloaded weights in pinned host memory; the
#   diffusers docs put it at about 2× the model size. By that rule SDXL (6.5 GiB of fp16 weights) wants about
#   13 GiB, more than Colab's 12.7 GB: on Colab do not run SDXL at `ultra`. `aggressive` offloads the same groups
#   without streams and without the pinned copy: slower, no pinned RAM.
# - **Speed.** Every offload trades time for memory. For plain diffusers 0.42.1 on an H200 (fp16, 20 steps, random
#   weights; not mlnb's figures, see notebook 02), SDXL took 1.41 s with no offload, 5.09 s with model offload,
#   5.74 s with leaf-level group offload and streams and 23.6 s with sequential offload. mlnb's own figures come
#   from `mlnb bench` ([docs/benchmarks.md](https://github.com/mlnb-project/mlnb/blob/main/docs/benchmarks.md)).
#
# No xformers on Colab: mlnb uses PyTorch's SDPA and says so in the report.

# %% [markdown]
# ## The 4 GB settings, on the model at hand
#
# The same `%%generate` a 4 GB card would run: `--level ultra`. On a CPU the offloads are skipped with their reason
# (there is no GPU to offload from); with a real model on a GPU they run.

# %%
# %%generate --model {MODEL} --level ultra --width {SIZE} --height {SIZE} --steps {STEPS} --seed 7 --quiet --out small
a watercolor fox in a snowy forest

# %%
small.techniques

# %%
# %vram free

# %% [markdown]
# ## SD1.5 on a T4
#
# `variant="fp16"` downloads the half-precision weights only. `auto` picks `none` on a T4.

# %%
if GPU:
    sd15 = mlnb.load_pipeline(SD15, level="auto", variant="fp16")
    print(sd15.choice)
    result = sd15.generate(PROMPT, steps=30, width=512, height=512, seed=7)
    display(result)
else:
    print("skipped: needs a CUDA GPU (downloads SD1.5 and runs 30 steps at 512²)")

# %% [markdown]
# ## SDXL on a T4
#
# One model at a time on a small card: `%vram free` (or `mlnb.unload_all()`) first.

# %%
if GPU:
    mlnb.unload_all()
    sdxl = mlnb.load_pipeline(SDXL, level="auto", variant="fp16")
    print(sdxl.choice)
    result = sdxl.generate(PROMPT, steps=30, width=1024, height=1024, seed=7)
    display(result)
    print(result.techniques)
else:
    print("skipped: needs a CUDA GPU (downloads SDXL and runs 30 steps at 1024²)")

# %% [markdown]
# ## A 4 GB card, simulated on a bigger one
#
# `set_memory_cap` makes this process see a smaller card: torch refuses allocations past the cap, and `auto` sees
# the capped free memory. SD1.5 then runs at `ultra`. (On Colab, keep SDXL out of `ultra`: see host RAM above.)

# %%
if GPU:
    mlnb.unload_all()
    get_device().set_memory_cap(4 * GiB)
    try:
        small_card = mlnb.load_pipeline(SD15, level="auto", variant="fp16")
        print(small_card.choice)
        result = small_card.generate(PROMPT, steps=30, width=512, height=512, seed=7)
        display(result)
    finally:
        mlnb.unload_all()
        get_device().set_memory_cap(None)
else:
    print("skipped: needs a CUDA GPU (caps it at 4 GiB, then runs SD1.5 at ultra)")

# %% [markdown]
# If a generation still runs out of memory, mlnb frees everything and retries once at the next stronger level; at
# `ultra` it stops with one line saying what would fit (a smaller size, fewer images). See the
# [user guide](https://github.com/mlnb-project/mlnb/blob/main/docs/user_guide.md#troubleshooting).
