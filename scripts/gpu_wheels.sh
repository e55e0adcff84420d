#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs on a GPU machine that has torch, transformers and accelerate but
# not diffusers, peft or IPython, and no package index (pure-Python wheels, plus wcwidth's manylinux one):
#
#   scripts/gpu_wheels.sh [DIR] [PYTHON_VERSION]      # default ./.whl and 3.12
#
# Then carry DIR to the GPU machine with the working tree; gpu_check.sh installs every wheel in ./.whl (or
# $MLNB_WHEELS) with --no-index --no-deps into a folder on PYTHONPATH. Versions are those the measured runs used.
set -euo pipefail
dir=${1:-.whl}
py=${2:-3.12}
mkdir -p "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
  diffusers==0.42.1 importlib_metadata==10.2.0 peft==0.22.0 \
  ipython==9.18.1 ipython_pygments_lexers==1.1.1 traitlets==5.16.1 decorator jedi==0.20.1 parso==0.8.7 \
  matplotlib-inline==0.2.2 prompt_toolkit==3.0.53 wcwidth==0.9.4 pexpect==4.9.0 ptyprocess==0.7.0 \
  stack-data==0.6.3 executing==2.3.0 asttokens==3.0.2 pure_eval==0.2.4 \
  ipywidgets==8.1.9 comm==0.2.3 widgetsnbextension==4.0.16 jupyterlab_widgets==3.0.17
ls "$dir"
