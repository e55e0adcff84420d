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
# # 04 · The dashboard
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mlnb-project/mlnb/blob/main/notebooks/04_dashboard.ipynb)
#
# `mlnb.dashboard()` returns an ipywidgets panel over the session: live memory gauges (VRAM used, VRAM reserved by
# torch, host RAM), the level `auto` picks and what is loaded, the level and model controls, a
# **Free memory** button, the per-cell history as a chart and a table, and a **Generate** form. It works on
# ipywidgets 7.7.1 (Colab) and 8. ipywidgets is optional for the rest of mlnb: `pip install ipywidgets matplotlib`
# (from a checkout, `pip install -e ".[widgets]"`).
#
# The gauges update once a second from a background thread until the panel is closed. Widgets only render in a
# live notebook, so this page's stored copy shows the panel's text form at most: run it to see the panel.

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

# %%
# %load_ext mlnb

# %% [markdown]
# A generation first, so the history and the "loaded" line have something to show. The dashboard's model field
# follows the model `%%generate` remembered.

# %%
# %%generate --model {MODEL} --width {SIZE} --height {SIZE} --steps {STEPS} --seed 7 --quiet --out result
a watercolor fox in a snowy forest

# %% [markdown]
# ## Open it
#
# Display the panel as a cell's last expression (or use `%vram dashboard`, which returns the same panel).

# %%
# NBVAL_IGNORE_OUTPUT
# (a widget's stored text form holds live figures: host RAM, times)
board = mlnb.dashboard()
board

# %% [markdown]
# What it shows, top to bottom:
#
# - **Memory**: one gauge per figure: VRAM used device-wide (NVML, all processes), VRAM reserved by torch (this
#   process), host RAM used. Without a GPU the VRAM gauges say `N/A (no GPU)` instead of showing zeros.
# - **level / loaded**: the level `auto` would pick now and why, and the loaded pipelines with their levels.
# - **Controls**: the session's default level, or a VRAM budget typed in such as `4GiB` (the same setting as
#   `%vram level NAME`), and model (the one `%%generate` remembers); **Free memory** does what `%vram free` does and
#   shows its one-line report.
# - **Cell history**: the peak of each monitored cell as a chart, and the last cells as a table (`%vram history`).
# - **Generate**: prompt, negative prompt, steps, seed, size; runs in a background thread with a progress bar, shows
#   the image and the report line, and keeps the cell free. The button is disabled while a generation runs.
#
# The panel and `%vram` read the same state: change the level with `%vram level` and the level box follows.

# %%
# %vram level balanced

# %%
# %vram level auto

# %% [markdown]
# ## Close it
#
# `board.close()` stops the updates and closes the widgets; `%unload_ext mlnb` closes every open dashboard.

# %%
board.close()
print("updating:", board.running)
