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
# # 07 · SD3.5 and Flux: transformer denoisers
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mlnb-project/mlnb/blob/main/notebooks/07_sd35_and_flux.ipynb)
#
# Stable Diffusion 3.5 and FLUX.1 denoise with a transformer instead of a UNet, and they are large: FLUX.1's
# transformer alone does not fit a T4 in 16 bits, and both encode the prompt with T5-XXL as well as CLIP. mlnb plans
# them as it plans a UNet: the units of the transformer (its `transformer_blocks`, Flux's
# `single_transformer_blocks`, and the embedders around them) are kept on the card or streamed, and the text
# encoders stream unit by unit while they encode.
#
# This page runs in seconds on a CPU, on the tiny random-weight SD3 and Flux pipelines of `mlnb.testing` (built
# once, no download). The plans of the real models are computed from their public configs on PyTorch's `meta`
# device (shapes, no weights). Nothing here is a GPU measurement.

# %%
# Parameters: set MLNB_MODEL to an SD3.5 or FLUX.1 hub id or local folder, and LORA to a LoRA for it, for real ones.
import os
import sys

if "google.colab" in sys.modules:  # Colab has torch and diffusers already: add mlnb (not on PyPI)
    # %pip install -q git+https://github.com/mlnb-project/mlnb

import mlnb
from mlnb.testing import default_tiny_model, tiny_lora

TINY_FLUX = default_tiny_model("flux")  # the simulated cards below load the tiny Flux whatever MODEL is
CACHE = TINY_FLUX.parent  # $MLNB_CACHE: the tiny LoRAs and models made below go beside the tiny models
MODEL = os.environ.get("MLNB_MODEL") or str(TINY_FLUX)
SD3 = str(default_tiny_model("sd3"))  # the tiny SD3 beside it
TINY = not os.environ.get("MLNB_MODEL")
SIZE = 64 if TINY else 1024  # pixels; SD3.5 and FLUX.1 are made for 1024²
STEPS = 2 if TINY else 20
# a tiny random LoRA for the tiny Flux (a real LoRA is a .safetensors file, a folder holding one, or a hub id)
LORA = os.environ.get("LORA") or str(tiny_lora(MODEL, CACHE / "tiny-flux-lora", seed=1))
PROMPT = "a watercolor fox in a snowy forest"

# %%
# %load_ext mlnb

# %% [markdown]
# ## Loading with a budget, and reading the plan
#
# `load_pipeline(model, budget="15GiB")` (or `%%generate --vram 15GiB`) plans the placement for that much VRAM and
# prints the plan as the pipeline loads. Here, without a GPU, the plan is computed and shown but not applied. The
# tiny model fits any budget whole, so every unit is kept.

# %%
flux = mlnb.load_pipeline(MODEL, budget="15GiB")
print(flux.plan)

# %% [markdown]
# The plan's units are listed in the order the transformer's forward runs them, not the order its modules were
# registered: first the embedders, then the double-stream `transformer_blocks`, then Flux's single-stream
# `single_transformer_blocks`, then the output norm and projection. A streamed plan copies them in that order, each
# as soon as its place in the GPU ring is free. The text encoders are cut into units the same way, T5 into its
# embedding, its blocks and its final norm, so while it encodes it holds two slots of its largest unit, not the
# whole encoder. The tiny encoders are small enough to be one unit each; the real T5-XXL's 50 units are further down.

# %%
from mlnb.planner import denoiser_blocks, model_facts
from mlnb.planner.blocks import model_units, text_encoders
from mlnb.units import format_bytes

print("transformer:", ", ".join(denoiser_blocks(flux.pipe)))
for name, encoder in text_encoders(flux.pipe).items():
    print(f"{name}: {type(encoder).__name__}, {len(model_units(encoder))} unit(s)")
print("kept:", len(flux.plan.resident), "units; streamed:", len(flux.plan.streamed))

# %% [markdown]
# The same `%%generate` a card with 15 GiB would run: the cell uses the pipeline loaded above (same model, same
# budget), and its report line says what the plan did.

# %%
# %%generate --model {MODEL} --vram 15GiB --width {SIZE} --height {SIZE} --steps {STEPS} --seed 7 --out fox
a watercolor fox in a snowy forest

# %% [markdown]
# SD3 is planned the same way: its units are `pos_embed`, the embedders, its joint `transformer_blocks`, and the
# output norm and projection; it has three text encoders (two CLIPs and T5).

# %%
sd3 = mlnb.load_pipeline(SD3, budget="8GiB")
print(sd3.plan)
print("transformer:", ", ".join(denoiser_blocks(sd3.pipe)))
print("text encoders:", ", ".join(f"{n} ({type(e).__name__})" for n, e in text_encoders(sd3.pipe).items()))

# %% [markdown]
# ## LoRAs on SD3 and Flux
#
# LoRAs for SD3 and Flux load as for the UNet models (notebook 06): unfused, beside the base weights, switched
# without reading the model again. `mlnb.testing.tiny_lora` builds tiny random ones over the transformer's attention
# projections.

# %%
# %%generate --model {MODEL} --vram 15GiB --width {SIZE} --height {SIZE} --steps {STEPS} --seed 7 --lora {LORA}:0.8 --out styled
a watercolor fox in a snowy forest

# %%
sd3 = mlnb.load_pipeline(SD3, budget="8GiB", loras=[(str(tiny_lora(SD3, CACHE / "tiny-sd3-lora", seed=2)), 0.5)])
print([(a.spec.scale, a.nbytes) for a in sd3.loras])

# %% [markdown]
# `%vram` lists the loaded pipelines with their dtype, setting and LoRAs:

# %%
# %vram

# %% [markdown]
# ## One model at a time
#
# `%vram free` unloads every cached pipeline: on a small card, do it before switching to another large model. The
# next sections load the tiny Flux on simulated cards, one after the other.

# %%
# %vram free

# %% [markdown]
# ## What `auto` picks
#
# Without a budget, `auto` on a CUDA card plans for the VRAM free when the model loads: everything kept when it
# fits, else as much as fits with the rest streamed. On a CPU there is nothing to offload to, so `auto` is level
# `none` (the `%load_ext` line above says so). `mlnb.testing.FakeDevice` simulates a card on the CPU (its tensors
# stay in host RAM) to show the choice on a free T4 (15 GiB, no bf16 in hardware) and an A10G (24 GiB, bf16 in
# hardware): the plan for what is free, and the dtype the card computes in. The simulated cards have names of their
# own, so that what the planner caches about a card (`$MLNB_CACHE/cards.json`) never mixes them up with real ones.

# %%
from mlnb.testing import FakeDevice
from mlnb.units import GiB

t4 = FakeDevice(name="simulated Tesla T4", total=15 * GiB, compute_capability=(7, 5), cuda_like=True)
a10g = FakeDevice(name="simulated NVIDIA A10G", total=24 * GiB, compute_capability=(8, 6), cuda_like=True)
for device in (t4, a10g):
    pipe = mlnb.load_pipeline(TINY_FLUX, device=device)
    t5 = pipe.pipe.text_encoder_2
    wo = t5.encoder.block[0].layer[1].DenseReluDense.wo
    print(f"{device.info().name}: {pipe.choice}; transformer {pipe.pipe.transformer.dtype}, "
          f"T5 {t5.dtype} with its wo layers in {wo.weight.dtype}")
    pipe.unload()

# %% [markdown]
# ## The compute dtype per card
#
# SD3.5 and Flux were trained in bf16, which has fp32's range; fp16 tops out at 65504. `load_pipeline` picks the
# dtype from the card and the model's family (its `model_index.json` names the denoiser's class). The whole policy is
# one pure function, `mlnb.pipeline.precision.choose_dtype`; this table is its answer for each card:

# %%
from mlnb.pipeline.precision import ModelFamily, choose_dtype

CARDS = [
    ("CPU (no CUDA card)", False, None),
    ("Tesla V100 (7.0)", True, (7, 0)),
    ("Tesla T4 (7.5)", True, (7, 5)),
    ("A100 (8.0)", True, (8, 0)),
    ("L4 (8.9)", True, (8, 9)),
    ("H100 (9.0)", True, (9, 0)),
]
FAMILIES = [ModelFamily.UNET, ModelFamily.SD3, ModelFamily.FLUX]
print(f"{'card (compute capability)':<26}" + "".join(f"{f.label:<8}" for f in FAMILIES))
for card, cuda, capability in CARDS:
    row = [choose_dtype(f, cuda=cuda, compute_capability=capability).dtype for f in FAMILIES]
    print(f"{card:<26}" + "".join(f"{d:<8}" for d in row))
print()
print(choose_dtype(ModelFamily.FLUX, cuda=True, compute_capability=(7, 5), card="Tesla T4").reason)

# %% [markdown]
# On a T4 they run in fp16 and rely on the libraries' own safeguards: transformers keeps T5's `wo` layers in fp32
# (seen above on the simulated T4) and clamps T5's hidden states in fp16, and diffusers clips Flux's residual
# streams to ±65504 in fp16. Whether the real SD3.5 and FLUX.1 weights stay finite in fp16 on a T4 has not been
# measured by mlnb yet. If a generation overflows anyway, it does not return a black image: every step's latents
# and the VAE's output are checked, and the generation stops with one line.
#
# To show that line honestly on a CPU, the next cell makes a copy of the tiny Flux whose output projection is scaled
# by 10⁷, so that its prediction passes fp16's 65504 at the first step (the test suite does the same). On the
# simulated T4 it loads in fp16 and the CPU computes in fp16, so the overflow is real:

# %%
import shutil

from safetensors.torch import load_file, save_file

from mlnb.errors import NonFiniteOutputError

HOT = CACHE / "tiny-flux-overflows-fp16"
shutil.copytree(TINY_FLUX, HOT, dirs_exist_ok=True)
weights = HOT / "transformer" / "diffusion_pytorch_model.safetensors"
state = load_file(weights)
state["proj_out.weight"] *= 1e7
save_file(state, weights, metadata={"format": "pt"})

try:
    mlnb.load_pipeline(HOT, device=t4).generate(PROMPT, steps=2, width=64, height=64, seed=7)
except NonFiniteOutputError as error:
    print(error)

# %% [markdown]
# The pipeline stays loaded (loading the same model in another dtype unloads it, and says so). In fp32, as on this
# CPU, the same model stays finite, and the guard lets the image through:

# %%
fp32 = mlnb.load_pipeline(HOT, dtype="fp32")
image = fp32.generate(PROMPT, steps=2, width=64, height=64, seed=7).image
mlnb.unload_all()
print(f"{fp32.dtype}: a {image.width}×{image.height} image")

# %% [markdown]
# ## The real models, planned from their public configs
#
# `mlnb.bench.models.build_arch_pipeline(name, device="meta")` builds SD3.5 medium, SD3.5 large and FLUX.1-dev with
# their real shapes and no weights. The plans below are what the planner makes for them at 1024², 20 steps, with no
# card measured yet and 12 GiB of host RAM to pin copies in (a free Colab has 12.7 GB in all): **computed here, not
# measured**. A tight budget streams most of the transformer; the text encoders never add more than their slots;
# what does not fit the host's pinned memory is copied from the weight files' mapping instead.

# %%
from mlnb.bench.models import build_arch_pipeline
from mlnb.planner import Workload, native_size, plan_for_budget

HOST = 12 * GiB  # host RAM a plan may pin
REAL = {}
for name in ("sd35-medium", "sd35-large", "flux-dev"):
    pipe = build_arch_pipeline(name, device="meta")  # 16-bit weights' shapes, no memory
    facts = model_facts(pipe)
    REAL[name] = pipe, facts
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e9
    encoders = ", ".join(f"{type(e).__name__} {format_bytes(facts.encoders[n])}"
                         for n, e in text_encoders(pipe).items())
    print(f"{name}: transformer {params:.2f} B parameters, {format_bytes(facts.denoiser)} with its buffers, "
          f"{len(facts.blocks)} units; {encoders}")
    work = Workload(*native_size(pipe), batch=1, steps=20)
    for gib in (15, 8, 4):
        plan = plan_for_budget(gib * GiB, facts, work=work, host=HOST)
        offloaded = "; encoders and VAE offloaded" if plan.offload_encoders_vae and plan.streamed else ""
        print(f"  {gib:>2} GiB: {plan.summary()}{offloaded}; predicted peak {format_bytes(plan.predicted_peak)}")

# %% [markdown]
# FLUX.1-dev under 15 GiB, a free T4: its double-stream blocks are large enough to be cut into their parts
# (`norm1`, `attn`, `ff`, ...), and the units run in this order, kept (K) or streamed (S):

# %%
pipe, facts = REAL["flux-dev"]
plan = plan_for_budget(15 * GiB, facts, work=Workload(1024, 1024, 1, 20), host=HOST)
kept = set(plan.resident)
order = [b.name for b in facts.blocks]
for unit in order[:8] + ["..."] + order[-4:]:
    print(("K " if unit in kept else "S ") + unit if unit != "..." else "  ...")
t5 = pipe.text_encoder_2
t5_units = model_units(t5)
print(f"T5-XXL: {format_bytes(facts.encoders['text_encoder_2'])} in {len(t5_units)} units "
      f"({', '.join(n for n, _ in t5_units[:3])}, ...); while it encodes it holds at most "
      f"{format_bytes(facts.encoder_slots)}")

# %% [markdown]
# ## On a GPU: what the real models need, and how fast they run
#
# - **Memory.** In 16 bits FLUX.1-dev's transformer is about 22 GiB and T5-XXL about 9 GiB (above): FLUX.1 does
#   not fit a T4 whole, and its host copy does not fit Colab's 12.7 GB of host RAM either: the plans above pin what
#   the host can hold and copy the rest (T5 first) from the files' mapping once per image. The planner keeps SD3.5
#   medium's transformer whole on a 15 GiB or an 8 GiB card, its text encoders coming to the card only while they
#   encode; SD3.5 large's transformer alone is more than a T4 holds. The plans above say what each budget keeps and
#   streams.
# - **Speed.** Streamed units are copied from pinned host memory during every step, behind the compute where the
#   card's bus keeps up; how much slower a streamed plan is than a resident one depends on the card, and is what
#   the benchmark measures. **No GPU figures exist yet for SD3.5 or FLUX.1 under mlnb**: the user guide's table
#   ([Which model fits which card](https://github.com/mlnb-project/mlnb/blob/main/docs/user_guide.md#which-model-fits-which-card))
#   has the plans and leaves the measured columns empty until a run fills them.
# - **The command that measures them**, on a machine with a CUDA GPU (random weights with the real shapes; each
#   card simulated by a memory cap; mlnb's plan beside diffusers' model offload, group offloading with streams and
#   fp8 layerwise casting; host RSS beside every row):
#
#   ```bash
#   mlnb bench --models sd35-medium,flux-dev   # every recipe, uncapped and under 15 and 8 GiB (SD3.5 medium also 4 GiB), 1024², 20 steps
#   mlnb bench --models flux-dev --recipes mlnb-auto,diffusers-layerwise-fp8 --caps flux-dev:15 --steps 8
#   MLNB_GPU_CHECK_STEPS=environment,install,bench-flux scripts/gpu_check.sh   # the project's GPU check for Flux
#   ```
#
#   [docs/benchmarks.md](https://github.com/mlnb-project/mlnb/blob/main/docs/benchmarks.md) explains the recipes,
#   the targets and how to read the JSON. On a CPU, `mlnb bench --device cpu --models sd35-medium,flux-dev --quick`
#   runs the same harness on the tiny stand-ins: a check of the harness, not a measurement.
# - **A real model in this notebook:** set `MLNB_MODEL` to an SD3.5 or FLUX.1 hub id or folder and `LORA` to a LoRA
#   for it; the cells that use `MODEL` then run it at 1024², 20 steps (the simulated cards and the overflow example
#   keep the tiny Flux).

# %%
# %unload_ext mlnb
