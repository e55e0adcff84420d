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
# # 05 · Real models on a Colab T4 and on a 4 GB card
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mlnb-project/mlnb/blob/main/notebooks/05_colab_t4_and_4gb.ipynb)
#
# Stable Diffusion 1.5 and SDXL with the level and settings that fit a free Colab T4 (15 GiB of VRAM, 12.7 GB of
# host RAM: the project's design notes on Colab's GPU runtime of 2026-08) and a 4 GB card. On Colab choose
# *Runtime → Change runtime type → T4 GPU* first.
#
# The cells that download and run the real models need a CUDA GPU. Without one they are skipped, each with a line
# that says so; everything else runs on the embedded tiny model.

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
# ## What `auto` plans, and why
#
# On a CUDA card `auto` is the budget planner for the free VRAM: the whole model on the GPU when it fits with the
# activations of one image at its native size (SD1.5 512², SDXL 1024²; SDXL's VAE decodes in fp32 because its
# config says `force_upcast`), else as much of the UNet as fits with the rest streamed block by block. The plans below
# are made for the public checkpoints' shapes, built on PyTorch's `meta` device (no memory, no download), with fp16
# weights (a T4 has no bf16). They are **computed here, not measured**, and assume the whole card is free.

# %%
from mlnb.bench.models import build_arch_pipeline
from mlnb.planner import Workload, model_facts, plan_for_budget
from mlnb.units import GiB

for name, side in [("sd15", 512), ("sdxl", 1024)]:
    facts = model_facts(build_arch_pipeline(name, device="meta"))  # the real shapes, no weights
    work = Workload(side, side, batch=1, steps=30, vae_fp32=(name == "sdxl"))
    for card, budget in [("T4, 15 GiB", 15 * GiB), ("4 GiB card", 4 * GiB)]:
        print(f"{card:<11} {name:<5} {plan_for_budget(budget, facts, work=work)}")

# %% [markdown]
# ## The settings
#
# | | Colab T4: 15 GiB VRAM, 12.7 GB RAM | 4 GB card |
# |---|---|---|
# | SD1.5, 512², 30 steps | `auto`: everything on the GPU | `auto`: everything on the GPU |
# | SDXL, 1024², 30 steps | `auto`: everything on the GPU; `balanced` (model offload) when other work shares the card | `auto`: the largest UNet blocks kept, the rest (about 2.0 GiB) streamed every step, VAE in 256 px tiles |
#
# Two things decide beyond VRAM:
#
# - **Host RAM.** Streamed weights sit in pinned host memory. A plan pins only what it streams (on a 4 GB card about
#   2.0 GiB of SDXL's UNet and its 1.52 GiB of text encoders, of 6.5 GiB in all) after the rest has gone to the GPU.
#   The fixed level `ultra` streams the whole pipeline: plain diffusers' group offloading of SDXL peaked at
#   14.35 GiB of host RAM on an H100 machine (2.2× the fp16 weights; run 5 in `docs/benchmarks.md`, 2026-11-26),
#   more than Colab's 12.7 GB, so on Colab do not run SDXL at `ultra`.
#   `aggressive` offloads the same groups without streams and without the pinned copy: slower, no pinned RAM.
# - **Speed.** Every offload trades time for memory. Run 5 in
#   [docs/benchmarks.md](https://github.com/mlnb-project/mlnb/blob/main/docs/benchmarks.md) measured on one H100
#   (2026-11-26, torch 2.11.0+cu130, diffusers 0.42.1, fp16, 20 steps, random weights,
#   `MLNB_GPU_CHECK_BENCH="--quick --steps 20 --device cuda --timeout 150" scripts/gpu_check.sh`). Plain diffusers:
#   SDXL took 1.62 s with no offload and 6.59 s with leaf-level group offload and streams under a 4 GiB cap; SD1.5
#   0.71 s and 2.27 s under 2 GiB. mlnb's plans: 2.09 s for SDXL under a 15 GiB cap (all resident; 0.33 s of it the
#   cache clear after the image), 3.04 s under 4 GiB (part of the UNet streamed) and 1.11 s for SD1.5 under 2 GiB
#   (the streaming plans are still short of their targets).
#
# No xformers on Colab: mlnb uses PyTorch's SDPA and says so in the report.

# %% [markdown]
# ## The 4 GB settings, on the model at hand
#
# The same `%%generate` a 4 GB card would run, given its budget: `--vram 4GiB` (on the card itself `auto` plans for
# what is free, which comes to the same). On a CPU the plan is computed and shown but not applied (there is no GPU
# to place anything on); with a real model on a GPU it runs. The plan is printed as the pipeline loads. The fixed
# levels remain: `--level ultra` streams every weight whatever the budget.

# %%
# %%generate --model {MODEL} --vram 4GiB --width {SIZE} --height {SIZE} --steps {STEPS} --seed 7 --quiet --out small
a watercolor fox in a snowy forest

# %%
small.techniques

# %%
# %vram free

# %% [markdown]
# ## SD1.5 on a T4
#
# `variant="fp16"` downloads the half-precision weights only. On a T4, `auto` keeps the whole model on the GPU.

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
# `set_memory_cap` makes this process see a smaller card: torch refuses allocations past the cap, and `auto` plans
# for the capped free memory. SD1.5's 2 GiB of weights still fit whole in 4 GiB.

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
    print("skipped: needs a CUDA GPU (caps it at 4 GiB, then plans and runs SD1.5)")

# %% [markdown]
# If a generation still runs out of memory, mlnb frees everything and retries once at the next stronger level; at
# `ultra` it stops with one line saying what would fit (a smaller size, fewer images). See the
# [user guide](https://github.com/mlnb-project/mlnb/blob/main/docs/user_guide.md#troubleshooting).
