#!/usr/bin/env bash
# Create .venv and install tc-llava with its dev extra from the committed lock, from nothing.
#   LOCK=requirements/lock.txt (default): the exact versions CI tested, for CPython 3.11 on
#        Linux x86_64 (refresh: bash scripts/lock.sh); LOCK=none: pyproject's ranges instead.
#   TORCH="torch==2.14.1 torchvision==0.29.1" (default): torch and torchvision are installed apart
#        from the lock, pinned in every pip command so that nothing pulls a different build.
#        torchvision is needed because a family's frames go through HF's own processors
#        (LlavaOnevisionVideoProcessor, CLIPImageProcessor, ...), whose backend is torchvision; the PIL
#        processors transformers also ships give slightly different pixel values. The pair is the
#        package index's matching one: its torchvision for torch 2.13 (0.28.0) does not import beside
#        the CPU build torch 2.13.0+cpu ("operator torchvision::nms does not exist"). These are CUDA 13
#        builds (~5 GB with their nvidia-* libraries, which the lock pins); they run on CPU.
#   VENV=.venv, PYTHON=python3.
#   TORCH_FROM=.venv (default): for any other VENV, hard-link that venv's torch and torchvision (with
#        their nvidia-*/triton libraries) instead of installing a second ~5.5 GB copy
#        (scripts/link_torch.py; it installs as usual when the versions differ). TORCH_FROM= turns it off.
# DeepSpeed ships as source only and builds against the installed torch, hence torch first
# and --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH="${TORCH:-torch==2.14.1 torchvision==0.29.1}"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
LOCK="${LOCK:-requirements/lock.txt}"
TORCH_FROM="${TORCH_FROM-.venv}"
PY="$VENV/bin/python"
if [ "$LOCK" != none ]; then
    [ -f "$LOCK" ] || { echo "setup.sh: LOCK=$LOCK not found" >&2; exit 2; }
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        echo "setup.sh: $LOCK is for CPython 3.11 (what CI tests); $PYTHON is $("$PYTHON" -V 2>&1)." >&2
        echo "  Use PYTHON=python3.11, or LOCK=none to install pyproject's version ranges (a combination CI did not test)." >&2
        exit 2
    fi
fi
[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
if [ -n "$TORCH_FROM" ] && [ -x "$TORCH_FROM/bin/python" ] && [ "$(realpath "$TORCH_FROM")" != "$(realpath "$VENV")" ]; then
    "$PYTHON" scripts/link_torch.py "$TORCH_FROM" "$VENV" "$TORCH"
fi
if [ "$LOCK" = none ]; then
    "$PY" -m pip install -q --upgrade pip setuptools wheel
    "$PY" -m pip install -q $TORCH
    "$PY" -m pip install -q --no-build-isolation $TORCH -e ".[dev]"
else
    "$PY" -m pip install -q $(grep -E '^(pip|setuptools|wheel)==' "$LOCK")
    "$PY" -m pip install -q $TORCH  # word-split on purpose: TORCH may name torch and torchvision
    # --no-deps: exactly the lock; pip check below proves it complete and consistent.
    "$PY" -m pip install -q --no-deps --no-build-isolation -r "$LOCK"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
# decord's only wheel (py3-none-manylinux2010 by its name) declares cp36 inside: pip check flags it, it works.
problems=$("$PY" -m pip check 2>&1 | grep -v '^decord 0.6.0 is not supported on this platform$' | grep -v '^No broken requirements found.$' || true)
[ -z "$problems" ] || { echo "setup.sh: pip check: $problems" >&2; exit 1; }
"$PY" -c "import torch, torchvision, transformers, deepspeed; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
