#!/usr/bin/env bash
# Create .venv and install tc-llava with its dev extra, from nothing.
# torch is pinned in every pip command (TORCH, default the CPU build 2.13.0), so no other
# requirement can pull a different (multi-GB CUDA) build. DeepSpeed ships as source only
# and builds against the installed torch, hence torch first and --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH="${TORCH:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q "$TORCH"
.venv/bin/python -m pip install -q --no-build-isolation "$TORCH" -e ".[dev]"
.venv/bin/python -c "import torch, transformers, deepspeed; print('torch', torch.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
