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
# # 06 · LoRAs and image-to-image
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mlnb-project/mlnb/blob/main/notebooks/06_loras_and_img2img.ipynb)
#
# A LoRA changes what a loaded model draws without loading another model: mlnb applies it unfused beside the base
# weights (peft's layers, through diffusers), so switching LoRAs reads nothing of the base model again and clearing
# them gives the base weights back bit for bit. Image-to-image and inpainting run diffusers' pipelines for those
# tasks made from the loaded components: the same weights, the same memory setting, the same LoRAs.
#
# This page runs in seconds on the embedded tiny model with tiny random LoRAs; set `MLNB_MODEL` and `LORA` for real
# ones.

# %%
# Parameters: set MLNB_MODEL to a hub id or a local diffusers folder, and LORA to a .safetensors file for real ones.
import os
import sys

if "google.colab" in sys.modules:  # Colab has torch and diffusers already: add mlnb (not on PyPI)
    # %pip install -q git+https://github.com/mlnb-project/mlnb

import mlnb
from mlnb.testing import tiny_lora

MODEL = os.environ.get("MLNB_MODEL") or str(mlnb.testing.default_tiny_model())
TINY = not os.environ.get("MLNB_MODEL")
SIZE = 64 if TINY else 512  # pixels; 512 suits SD1.5, use 1024 for SDXL
STEPS = 4 if TINY else 20
# two tiny random LoRAs for the tiny model (a real LoRA is a .safetensors file, a folder holding one, or a hub id)
LORA = os.environ.get("LORA") or str(tiny_lora(MODEL, seed=1))
LORA_2 = str(tiny_lora(MODEL, seed=2)) if TINY else LORA

# %%
# %load_ext mlnb

# %% [markdown]
# ## LoRAs in a cell
#
# `--lora PATH_OR_ID[:SCALE]` names a LoRA and its scale (1 when none is given); repeat it for several. A cell
# generates with exactly the LoRAs it names: the next cell without `--lora` generates without them. Quote a path
# with spaces (`--lora "/content/my loras/ink.safetensors:0.8"`).

# %%
# %%generate --model {MODEL} --width {SIZE} --height {SIZE} --steps {STEPS} --seed 7 --out base
a watercolor fox in a snowy forest

# %%
# %%generate --model {MODEL} --width {SIZE} --height {SIZE} --steps {STEPS} --seed 7 --lora {LORA}:0.8 --lora {LORA_2} --out styled
a watercolor fox in a snowy forest

# %% [markdown]
# The report line names the LoRAs, and the result records them (source and scale). The pipeline is the cached one:
# the same model with other LoRAs is not another load.

# %%
print([(os.path.basename(spec.source), spec.scale) for spec in styled.loras])
print("cached pipelines:", len(mlnb.pipeline.cached_pipelines()))

# %% [markdown]
# ## LoRAs in Python
#
# `load_pipeline(..., loras=[path | (path, scale)])` applies them to the cached pipeline; `set_loras([...])` switches
# them and `set_loras([])` clears them. `pipe.loras` lists the active ones with their adapter bytes; `%vram` lists
# them too, and so does the dashboard.

# %%
pipe = mlnb.load_pipeline(MODEL, loras=[(LORA, 0.5)])
print([(a.spec.scale, a.nbytes) for a in pipe.loras])
pipe.set_loras([])
again = pipe.generate("a watercolor fox in a snowy forest", steps=STEPS, width=SIZE, height=SIZE, seed=7)
print("base image again, exactly:", again.image.tobytes() == base.image.tobytes())

# %% [markdown]
# ## Image-to-image and inpainting
#
# `--image` starts from an image file or a notebook variable holding a PIL image; `--strength` (in (0, 1]) says how
# much may change. With `--mask` too (white is repainted, black kept; the image's size), it inpaints. In Python:
# `generate(prompt, image=..., strength=..., mask_image=...)`.

# %%
start = base.image

# %%
# %%generate --model {MODEL} --steps {STEPS} --seed 7 --image start --strength 0.5 --out sketch
the same fox, in ink

# %%
from PIL import Image, ImageDraw

mask = Image.new("L", start.size, 0)
ImageDraw.Draw(mask).rectangle([start.width // 2, 0, start.width, start.height], fill=255)  # repaint the right half

# %%
# %%generate --model {MODEL} --steps {STEPS} --seed 7 --image start --mask mask --out painted
a red fox

# %% [markdown]
# Every bad input is one line, and the pipeline stays as it was: a LoRA that is not there, a pickle file without
# `--allow-pickle`, a LoRA for another architecture, a scale that is not a finite number, an image that does not
# open, a mask of another size, a strength outside (0, 1].

# %% tags=["raises-exception"]
# %%generate --model {MODEL} --steps {STEPS} --image start --strength 1.5
a fox

# %%
# %unload_ext mlnb
