# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Quickstart: one image, and where the memory went
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mlnb-project/mlnb/blob/main/notebooks/01_quickstart.ipynb)
#
# `%load_ext mlnb` gives a notebook two magics, `%%generate` (text to image with a diffusers pipeline) and `%vram`
# (where GPU memory went), and a per-cell memory monitor that cleans up after every cell.
#
# This notebook runs anywhere. Without a `MLNB_MODEL` it uses mlnb's embedded **tiny random-weight model** (a few
# MiB, built on first use, nothing downloaded), so the "image" is noise and every figure is tiny: it shows the
# mechanics, not image quality. Set `MLNB_MODEL` to a real model (a hub id or a local diffusers folder) and rerun
# for real pictures.

# %% [markdown]
# ## Install and parameters
#
# On Colab, torch, diffusers and transformers are already installed, and the first cell adds mlnb from its
# repository (mlnb is not published on PyPI). Elsewhere, install torch first (on a machine without a GPU
# `pip install torch==2.13.0`, the CPU build), then mlnb from a checkout (`pip install -e .`) or from a wheel
# (`python -m build` in the checkout, then `pip install dist/mlnb-*.whl`).
#
# `MODEL` is the only thing to change: set `MLNB_MODEL` to a hub id such as
# `stable-diffusion-v1-5/stable-diffusion-v1-5`, or to a local folder. The tiny model gets a tiny size and few steps
# so the notebook runs in seconds on a CPU.

# %%
# Parameters: set MLNB_MODEL to a hub id or a local diffusers folder for a real model.
import os
import sys

if "google.colab" in sys.modules:  # Colab has torch and diffusers already: add mlnb (not on PyPI)
    # %pip install -q git+https://github.com/mlnb-project/mlnb

import mlnb

MODEL = os.environ.get("MLNB_MODEL") or str(mlnb.testing.default_tiny_model())
TINY = not os.environ.get("MLNB_MODEL")
SIZE = 64 if TINY else 512  # pixels; 512 suits SD1.5, use 1024 for SDXL
STEPS = 4 if TINY else 30

# %% [markdown]
# ## Load the extension
#
# It prints one line: the mlnb version, the device and its free VRAM, and the level `auto` would pick.

# %%
# %load_ext mlnb

# %% [markdown]
# ## Generate
#
# The cell body is the prompt. `{MODEL}`, `{SIZE}` and `{STEPS}` in the option line are expanded by IPython from
# the notebook's variables (and `{var}` in the prompt by mlnb). The model is remembered for later cells. You get a
# progress bar, the image, and one line: size, steps, time, peak memory, the level and the techniques it applied,
# and what the cleanup freed. `--out first` keeps the result in a variable.

# %%
# %%generate --model {MODEL} --width {SIZE} --height {SIZE} --steps {STEPS} --seed 7 --out first
a watercolor fox in a snowy forest

# %% [markdown]
# The result says what ran. Every one of the eleven techniques is either applied or skipped with the reason. On a
# CPU there is no GPU memory to save, so the level is `none` and only the `gc.collect` cleanup runs.

# %%
first.techniques

# %% [markdown]
# `first.memory` is the generation's `MemoryReport`: on a GPU, allocated and reserved memory at start, peak and end,
# the device-wide figure from NVML, and what the cleanup freed; host RSS everywhere. On a CPU only host RSS is
# measured.

# %%
first.memory

# %% [markdown]
# The seed is recorded, also when none was given, so any image can be made again:

# %%
first.seed, first.params

# %% [markdown]
# ## `%vram`
#
# With no argument: the device, free and total VRAM, torch's allocated and reserved memory, host RAM, the level
# `auto` picks, and every loaded pipeline with its level and where its weights are.

# %%
# %vram

# %% [markdown]
# Next: [02 · levels](02_levels.ipynb) explains the four levels and what each technique costs,
# [03 · leak-free notebooks](03_leak_free_notebooks.ipynb) what the per-cell monitor frees.
