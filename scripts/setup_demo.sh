#!/usr/bin/env bash
# Create .venv-demo: tc-llava with the web demo (the `demo` extra: gradio, and selenium for its browser test),
# from requirements/lock-demo.txt: lock.txt's versions plus gradio's stack, with pillow 12 (gradio 6 needs
# pillow<13; lock.txt has 13). Same steps as setup.sh (torch hard-linked from .venv when it is there).
#   bash scripts/setup_demo.sh        then  .venv-demo/bin/tc-llava-demo outputs/train/demo/export
# The browser test also needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-demo}" LOCK="${LOCK:-requirements/lock-demo.txt}" bash scripts/setup.sh
"${VENV:-.venv-demo}/bin/python" -c "import gradio, selenium; print('gradio', gradio.__version__, '| selenium', selenium.__version__)"
