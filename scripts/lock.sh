#!/usr/bin/env bash
# Refresh the locks that scripts/setup.sh installs (the README path and CI), with uv:
#   requirements/lock.txt         pyproject's ranges resolved to the newest releases (the README install)
#   requirements/lock-oldest.txt  the same, with transformers at the oldest supported release (CI's other end)
# Both are for CPython 3.11 on Linux x86_64 (the CI machine) and leave torch out: setup.sh pins
# torch itself (TORCH=..., a CPU or CUDA build). The CPU build's metadata is read from
# TORCH_WHEELS (a folder holding it) so that no CUDA-only dependency enters the lock.
# After a refresh, run .ci/run: the lock is what CI tested only once CI has passed on it.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
OLDEST_TRANSFORMERS=5.17.0
TORCH="${TORCH:-torch==2.13.0}"
TORCH_WHEELS="${TORCH_WHEELS:-/opt/wheels}"
tools=.cache/lock-tools
[ -x "$tools/bin/uv" ] || { python3 -m venv "$tools" && "$tools/bin/pip" install -q "uv==$UV_VERSION"; }
compile() {  # compile OUT [extra constraint]
    local out=$1; shift
    printf '%s\n' "$TORCH" "$@" > .cache/lock-constraints.txt
    "$tools/bin/uv" pip compile -q pyproject.toml requirements/build.in --extra dev \
        --constraint .cache/lock-constraints.txt --find-links "$TORCH_WHEELS" \
        --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
        --no-emit-package torch --no-header --no-annotate --output-file "$out"
    sed -i "1i # Exact versions for CPython 3.11, Linux x86_64, torch installed separately ($TORCH). Refresh: bash scripts/lock.sh" "$out"
}
compile requirements/lock.txt
compile requirements/lock-oldest.txt "transformers==$OLDEST_TRANSFORMERS"
git diff --stat -- requirements/
