#!/usr/bin/env bash
# Creates .venv (once), installs torch and the build/test tools into it, and builds attngate_ext in place.
# Safe to rerun: an existing venv is reused and only changed sources are recompiled.
#
#   TORCH_SPEC   the torch requirement to install (default torch==2.13.0, the CPU build on the dev machines;
#                use e.g. "torch" or a CUDA build elsewhere)
#   VENV         where the virtual environment lives (default .venv)
#   ATTNGATE_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS   build switches, see setup.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$TORCH_SPEC" numpy ninja pytest setuptools wheel "transformers>=5.17,<5.25" safetensors peft matplotlib \
  "lm-eval[hf]>=0.4.13,<0.5"
"$VENV/bin/pip" install -q --no-build-isolation -e .
"$VENV/bin/python" -c "import torch, attngate_ext; print('attngate_ext', attngate_ext.__version__, '| torch', torch.__version__, '| CUDA kernels:', attngate_ext.cuda_kernels_available())"
