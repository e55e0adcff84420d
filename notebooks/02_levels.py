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
# # 02 · Levels: what each one does, what it costs, and how to read the report
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mlnb-project/mlnb/blob/main/notebooks/02_levels.ipynb)
#
# mlnb has four memory levels, `none`, `balanced`, `aggressive` and `ultra`, plus `auto`, which picks one from
# free VRAM. A level is a set of techniques; each technique is applied for real or reported as skipped, with the
# reason. This notebook prints the sets, runs the same generation at every level, and reads the report.
#
# Without `MLNB_MODEL` it uses the embedded tiny random-weight model on whatever device is here. On a CPU nothing
# is offloaded (there is no GPU to offload *from*) and every offload says so: the report is the point, not the
# figures.

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
STEPS = 2 if TINY else 20
PROMPT = "a watercolor fox in a snowy forest"

# %% [markdown]
# ## The four levels
#
# `MemoryOptimizationConfig.from_level(level)` is a frozen dataclass with one field per technique. These are the
# techniques each level asks for (`gc_collect` and `cuda_cache_clear`, the cleanup, are on at every level):

# %%
from mlnb import MemoryOptimizationConfig

LEVELS = ["none", "balanced", "aggressive", "ultra"]
for level in LEVELS:
    print(f"{level:<10} {', '.join(MemoryOptimizationConfig.from_level(level).enabled())}")

# %% [markdown]
# In words:
#
# | level | for | offload | VAE | attention | weights |
# |---|---|---|---|---|---|
# | `none` | the model and its activations fit | none: the whole pipeline on the GPU | as is | SDPA | as loaded (fp16 on CUDA) |
# | `balanced` | 8–12 GB free, or more when the model does not fit | model CPU offload | tiling | xformers if it imports and passes its test, else SDPA | as loaded |
# | `aggressive` | 6–8 GB free | group offload, leaf level, no streams (sequential offload where group offload is missing) | tiling + slicing | as balanced; attention slicing and FF chunking asked for, applied only where they help (see below) | as loaded |
# | `ultra` | under 6 GB free | group offload, leaf level, with CUDA streams | tiling + slicing | as aggressive | fp8 storage of the denoiser |
#
# ## What each technique does, and what it costs
#
# - **Model CPU offload**: each component (text encoder, UNet, VAE) moves to the GPU while it runs and back after.
#   Peak drops to the largest component; every generation pays the transfers.
# - **Sequential CPU offload**: every leaf module is copied to the GPU for its own forward. The lowest peak, and
#   by far the slowest.
# - **Group offloading with streams**: like sequential, but the next group is prefetched on a CUDA stream while the
#   current one computes. The same low peak at a fraction of sequential's cost. Its price is host RAM: the weights
#   are kept in pinned memory, which the diffusers docs put at about 2× the model size (Colab's GPU runtime has
#   12.7 GB of RAM: the design notes' figure for the runtime of 2026-08).
#   `aggressive` runs it without streams (no pinned copy), `ultra` with.
# - **VAE tiling**: decode the latents in overlapping tiles. mlnb sets the tile size for the budget: the VAE's own
#   default is its `sample_size`, 1024 for SDXL, which does nothing for a 1024² image.
# - **VAE slicing**: decode a batch one image at a time; helps only with `--num-images` > 1.
# - **fp8 storage** (diffusers layerwise casting): the denoiser's weights are stored in fp8 and each layer is cast
#   up to fp16/bf16 for its forward. Roughly halves the denoiser's weight memory (norm and embedding layers stay in
#   fp16/bf16); the casts cost time.
# - **Attention slicing**: computes attention in slices. Under PyTorch's SDPA it only slows generation, so mlnb
#   skips it whenever SDPA or xformers is in use, and says so.
# - **xformers**: memory-efficient attention from the optional `xformers` package, used only when it imports and
#   passes diffusers' own test on this GPU; otherwise SDPA is used and reported.
# - **Feed-forward chunking**: only on models that implement `enable_forward_chunking`; the UNet of SD1.5 and SDXL
#   does not, so it is reported as skipped there.
# - **`gc.collect` and the CUDA cache clear**: the cleanup after load, after each generation, on unload and on error.

# %% [markdown]
# ## `auto`
#
# On a CUDA card, `auto` plans for the memory that is free when the model loads: the whole model on the GPU if it
# fits, else as much as fits with the rest streamed (the budget planner, `docs/planner.md`). On a CPU, where nothing
# can be offloaded, and when no plan fits, it is a table of free VRAM (decimal GB, as cards are sold): under 6 GB
# `ultra`, 6–8 GB `aggressive`, 8–12 GB `balanced`, and above 12 GB `none` when the weights plus the activations fit
# in 90% of what is free, else `balanced`. The table is a pure function, so it can be asked about any card:

# %%
from mlnb import choose_level
from mlnb.units import GB, GiB

print(choose_level(None))  # no GPU
print(choose_level(4 * GB))  # a 4 GB card
print(choose_level(7 * GB))
print(choose_level(10 * GB))
print(choose_level(15 * GB, model_bytes=2 * GiB, reserve_bytes=1 * GiB))  # a T4 with SD1.5 in fp16
print(choose_level(15 * GB, model_bytes=13 * GiB, reserve_bytes=5 * GiB))  # ...with a model that does not fit

# %% [markdown]
# `mlnb.load_pipeline(MODEL)` (level `auto` by default) resolves it for the model at hand, from its real weight
# size and the activations for its native resolution:

# %%
pipe = mlnb.load_pipeline(MODEL)
pipe.choice

# %% [markdown]
# ## The same generation at every level
#
# One pipeline per (model, dtype, level) is kept; loading another level of the same model unloads the first (a
# small card cannot hold both), and says so in a warning.

# %%
results = {}
for level in LEVELS:
    results[level] = mlnb.load_pipeline(MODEL, level=level).generate(
        PROMPT, steps=STEPS, width=SIZE, height=SIZE, seed=7
    )
    print(f"{level:<10} {results[level].report_line()}")

# %% [markdown]
# ## Reading the report
#
# `result.techniques` lists all eleven techniques in a fixed order, each `applied` or `skipped` with the detail:
# what was done, or why not. A technique that did not run is never listed as applied.

# %%
report = results["ultra"].techniques
report

# %%
print("applied:", [r.technique.value for r in report.applied])
print("summary:", report.summary())
print(report["attention_slicing"])

# %% [markdown]
# `result.memory` is a `MemoryReport` for the generation: on a GPU, torch's allocated and reserved bytes at start,
# peak and end, the device-wide figure from NVML (all processes), host RSS, and `freed` (what the closing cleanup
# returned to the driver). On a CPU the GPU fields are `None`, shown as `N/A`, and the headline is host RSS.

# %%
memory = results["ultra"].memory
print("on a GPU:", memory.gpu)
print("peak allocated:", memory.peak_allocated)
memory

# %% [markdown]
# ## Reference figures (plain diffusers, not mlnb)
#
# To know what to expect on a GPU, these are figures from the project's design notes for **plain diffusers
# 0.42.1** (no mlnb), measured on an **NVIDIA H200**, fp16, 20 steps, with the real SD1.5 and SDXL architectures and
# **random weights**. They are not mlnb's numbers; the date and the exact command were not recorded with them.
# mlnb's own figures, with the card, versions, date and command of each run, come from `mlnb bench`: see
# [docs/benchmarks.md](https://github.com/mlnb-project/mlnb/blob/main/docs/benchmarks.md).
#
# Seconds per image / peak allocated GiB:
#
# | design notes: plain diffusers 0.42.1, H200, fp16, 20 steps | none | model offload | sequential | group leaf + stream | fp8 storage |
# |---|---|---|---|---|---|
# | SD1.5 512² | 0.50 / 2.66 | 2.23 / 1.77 | 7.52 / 0.63 | 1.89 / 0.63 | 0.94 / 1.86 |
# | SDXL 1024², fp16 VAE, tiles 512 | 1.41 / 7.22 | 5.09 / 5.23 | 23.6 / 0.64 | 5.74 / 0.64 | not measured |
#
# `mlnb bench` measured two of these recipes on one H100 (run 5 in
# [docs/benchmarks.md](https://github.com/mlnb-project/mlnb/blob/main/docs/benchmarks.md): torch 2.11.0+cu130,
# diffusers 0.42.1, 2026-11-26,
# `MLNB_GPU_CHECK_BENCH="--quick --steps 20 --device cuda --timeout 150" scripts/gpu_check.sh`). Plain diffusers
# with no offload: SD1.5 0.71 s / 2.64 GiB; SDXL 1.62 s / 11.52 GiB, with diffusers' default fp32 VAE decode,
# untiled. Group offloading (leaf level, streams): SD1.5 under a 2 GiB cap 2.27 s / 0.63 GiB; SDXL under a 4 GiB
# cap, fp16 VAE in 512 px tiles, 6.59 s / 0.64 GiB.
#
# What the design notes' measurements showed, and what mlnb does about it:
#
# - The SDXL VAE config has `force_upcast=True`: the decode then runs in fp32 and plain SDXL peaks at 11.55 GiB
#   instead of 7.22 on the H200 (11.52 GiB on the H100 of run 5: two cards). The upcast also crashes group
#   offloading (dtype mismatch). On a card that computes bf16 in hardware (compute capability 8.0 and up), mlnb
#   stores that VAE in bf16 (fp32's range, half its memory), so nothing is upcast. On a T4 it keeps the VAE
#   resident on the GPU when it group-offloads the rest.
# - `vae.enable_tiling()` tiles at `config.sample_size` (1024 for SDXL), which does nothing for a 1024² image;
#   mlnb sets the tile size.
# - Attention slicing under SDPA was 1.5× slower at the same peak (design notes: H200, plain diffusers 0.42.1, fp16,
#   20 steps; date and command not recorded); mlnb skips it there.
# - Group offloading with streams had the peak of sequential offload at about a quarter of its time (design notes,
#   H200). On the H100 of run 5 it took 3.18× (SD1.5) and 4.06× (SDXL) the time of no offload.

# %% [markdown]
# ## Choosing a level yourself
#
# `%%generate --level ultra` for one cell, `%vram level NAME` for the session's default, `level=` in
# `mlnb.load_pipeline`. A single technique can be changed with keyword overrides, e.g.
# `MemoryOptimizationConfig.from_level("ultra", fp8_storage=False)`, passed as `config=`.

# %%
# %load_ext mlnb

# %%
# %vram level ultra

# %%
# %vram level auto

# %% [markdown]
# Next: [03 · leak-free notebooks](03_leak_free_notebooks.ipynb).
