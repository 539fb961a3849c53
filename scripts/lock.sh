#!/usr/bin/env bash
# Refresh the locks that scripts/setup.sh installs (the README path and CI), with uv:
#   requirements/lock.txt         pyproject's ranges resolved to the newest releases (the README install)
#   requirements/lock-oldest.txt  the same, with transformers at the oldest supported release (CI's other end)
#   requirements/lock-lmms.txt    pyproject with the lmms extra (lmms-eval plugin), beside torch 2.14.1 +
#                                 torchvision 0.29.1 (scripts/setup_lmms.sh; its pins do not fit lock.txt)
#   requirements/lock-demo.txt    pyproject with the demo extra (gradio, selenium; scripts/setup_demo.sh):
#                                 gradio 6 needs pillow<13, which lock.txt's pillow is not
# All are for CPython 3.11 on Linux x86_64 (the CI machine) and leave torch and torchvision out:
# setup.sh pins them itself (TORCH=..., setup.sh's default pair, CUDA builds that run on CPU; their
# nvidia-* libraries and triton enter the lock, as that pair installs them). A CPU build of torch
# (TORCH=torch==2.13.0, no torchvision) has its metadata read from TORCH_WHEELS (a folder holding it).
# After a refresh, run .ci/run: the lock is what CI tested only once CI has passed on it.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
OLDEST_TRANSFORMERS=5.17.0
TORCH="${TORCH:-torch==2.14.1 torchvision==0.29.1}"
TORCH_WHEELS="${TORCH_WHEELS:-/opt/wheels}"
tools=.cache/lock-tools
[ -x "$tools/bin/uv" ] || { python3 -m venv "$tools" && "$tools/bin/pip" install -q "uv==$UV_VERSION"; }
compile() {  # compile OUT TORCH_PINS EXTRAS [extra constraint]
    local out=$1 torch=$2 extras=$3; shift 3
    printf '%s\n' $torch "$@" > .cache/lock-constraints.txt
    "$tools/bin/uv" pip compile -q pyproject.toml requirements/build.in $extras \
        --constraint .cache/lock-constraints.txt --find-links "$TORCH_WHEELS" \
        --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
        --no-emit-package torch --no-emit-package torchvision --no-header --no-annotate --output-file "$out"
    sed -i "1i # Exact versions for CPython 3.11, Linux x86_64, torch installed separately ($torch). Refresh: bash scripts/lock.sh" "$out"
}
compile requirements/lock.txt "$TORCH" "--extra dev"
compile requirements/lock-oldest.txt "$TORCH" "--extra dev" "transformers==$OLDEST_TRANSFORMERS"
compile requirements/lock-lmms.txt "torch==2.14.1 torchvision==0.29.1" "--extra dev --extra lmms"
# The demo's venv is lock.txt's versions plus gradio's stack, pillow excepted.
compile requirements/lock-demo.txt "$TORCH" "--extra dev --extra demo" $(grep -E '^[A-Za-z0-9_.-]+==' requirements/lock.txt | grep -v '^pillow==')
git diff --stat -- requirements/
