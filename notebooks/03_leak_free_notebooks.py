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
# # 03 · Leak-free notebooks: what pins GPU memory in a notebook, and what mlnb frees
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mlnb-project/mlnb/blob/main/notebooks/03_leak_free_notebooks.ipynb)
#
# A notebook keeps objects alive in places a script does not have: the **output cache** (`Out`, `_`, `__`, `_N`)
# holds whatever a cell returned, and after an error the **stored traceback** keeps every frame's local variables.
# Either can pin gigabytes of VRAM after `del`. On top of that, torch's **caching allocator** keeps freed memory
# reserved. This notebook creates each leak for real, shows what `%vram who` reports, and prints the memory
# before and after mlnb frees it.

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

# %% [markdown]
# ## A GPU, real or simulated
#
# With a CUDA GPU the tensors below are real CUDA tensors. **Without one, this notebook simulates a 4 GiB card
# with `mlnb.testing.FakeDevice`**: the tensors live in host RAM, and the fake card accounts for them as a CUDA
# caching allocator would (allocated when created, released when the tensor dies, reserved until the cache is
# cleared). mlnb's leak finding and cleanup run unchanged on it: they ask the current device whether it owns a
# tensor, which is what `device.track(tensor)` tells the fake one. The device must be set before `%load_ext`.

# %%
import weakref

import torch
from mlnb.device import get_device, set_device
from mlnb.monitor import release
from mlnb.testing import FakeDevice
from mlnb.units import format_bytes

GPU = get_device().is_cuda
if GPU:
    device = get_device()
    print(f"CUDA GPU: {device.info().name}; the tensors below are real CUDA tensors")
else:
    device = FakeDevice(total=4 * 2**30, name="simulated 4 GiB GPU (FakeDevice)")
    set_device(device)
    print("No CUDA GPU here: the GPU below is SIMULATED by mlnb.testing.FakeDevice (tensors stay in host RAM)")


def gpu_tensor(mib: int):
    """A float32 tensor of `mib` MiB on the GPU: a real CUDA tensor, or one the simulated card accounts for."""
    if GPU:
        return torch.zeros(mib * 2**18, device="cuda")
    tensor = device.track(torch.zeros(mib * 2**18))
    device.allocate(tensor.nbytes)
    weakref.finalize(tensor, device.release, tensor.nbytes)  # released when the tensor dies, as on CUDA
    return tensor


def show(label: str) -> None:
    release.wait_idle(1.0)  # the cache goes back in the background once the previous cell has ended
    snap = device.snapshot()
    print(f"{label}: allocated {format_bytes(snap.allocated)}, reserved {format_bytes(snap.reserved)}")


# %%
# %load_ext mlnb

# %%
show("start")

# %% [markdown]
# From here on, the per-cell monitor prints one line after each cell that touched GPU memory: time, peak, end and
# what its cleanup freed, plus a note when something pins memory.
#
# ## Leak 1: the output cache
#
# A cell whose last line is an expression puts the value in `Out[n]` and `_`. Looking at a tensor that way keeps
# it alive after `del`:

# %%
latents = gpu_tensor(256)  # stands for the latents a pipeline returned
latents  # looking at them stores them in Out[...] and _

# %%
del latents
show("after del latents")

# %% [markdown]
# Nothing in the namespace holds the 256 MiB any more. `%vram who` lists the largest GPU tensors reachable from the
# notebook and who holds them: the namespace, the output cache, or the last traceback.

# %%
# %vram who

# %% [markdown]
# `%vram free` unloads every cached pipeline and clears the allocator cache; with `--outputs` it first drops the
# output-cache entries that pin GPU tensors (only those: other outputs stay).

# %%
# %vram free --outputs

# %%
show("after %vram free --outputs")


# %% [markdown]
# ## Leak 2: a failed cell pins its locals
#
# After an error, `sys.last_traceback` (and IPython's copy of it, for `%debug`) keeps every frame of the failed call
# alive, with its local variables. First with the monitor **off**, to see the leak as it is without mlnb:

# %%
# %vram off

# %% tags=["raises-exception"]
def denoise(steps: int):
    latents = gpu_tensor(384)  # a local of the failing function
    for step in range(steps):
        if step == 2:
            raise RuntimeError(f"shape mismatch at step {step} (raised on purpose)")
    return latents


denoise(4)

# %%
show("after the error, monitor off")
# %vram who

# %% [markdown]
# The 384 MiB stay pinned by the traceback until the next error replaces it. Now the same failure with the monitor
# **on**: after the cell, mlnb finds that the stored traceback's frames hold GPU tensors, clears those frames (so
# `%debug` will not see their locals, and it says so), collects and clears the cache.

# %%
# %vram on

# %% tags=["raises-exception"]
denoise(4)

# %%
show("after the error, monitor on")

# %% [markdown]
# The new error's traceback would have pinned another 384 MiB; the cell's line shows it was freed (the earlier one
# was dropped when this error replaced it).
#
# ## The caching allocator
#
# Memory freed inside a cell goes back to torch's cache, not to the card: other processes (and `nvidia-smi`) still
# see it used. After a cell that used the GPU, mlnb gives the cache back once the cell has ended, in the background
# (the cell's line says `freed when idle`; `show` below waits for it). It does not run `gc.collect()` after every
# cell (slow in a big session): only after an error, or when a GPU cell ended holding more than it started with.

# %%
def step():
    scratch = gpu_tensor(512)  # a temporary, released when the function returns
    return float(scratch.sum())


step()

# %%
show("after the cell")

# %% [markdown]
# ## The per-cell history
#
# `%vram history` has one row per monitored cell: allocated memory at start, peak and end, what the cleanup freed,
# and the error if the cell failed.

# %%
# %vram history

# %% [markdown]
# ## Pipelines
#
# A generation runs inside its own `MemoryMonitor`, and its memory goes back once the cell has ended (not between
# the images of a loop); the pipeline stays cached for the next cell. `%vram free` unloads it (hooks, weights, pinned copies) and clears the cache. On the simulated card the
# weights stay in host RAM (compute runs on the CPU), so here only the unload count tells.

# %%
# %%generate --model {MODEL} --width {SIZE} --height {SIZE} --steps {STEPS} --seed 7 --quiet --out result
a watercolor fox in a snowy forest

# %%
# %vram free

# %% [markdown]
# In short: mlnb gives the allocator cache back after GPU cells, once the kernel is idle, clears the frames of a failed cell's traceback when they
# alone hold GPU tensors, points out outputs that pin GPU tensors, and drops them on `%vram free --outputs`. What it leaves
# to you: your own variables (`del` them, or `%vram free` to unload pipelines).
#
# Next: [04 · dashboard](04_dashboard.ipynb).
