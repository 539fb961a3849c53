#!/usr/bin/env bash
# Create .venv-lmms: tc-llava with the lmms-eval plugin (the `lmms` extra), from requirements/lock-lmms.txt.
# A separate environment because lmms-eval 0.7.3's pins do not fit the main lock: av<16 (the lock
# has 18), wandb==0.25.0 (0.31), filelock<4 (4.3). torch and torchvision are .venv's pair,
# TORCH="torch==2.14.1 torchvision==0.29.1" (setup.sh says why). Same steps as setup.sh: exact
# lock, --no-deps, pip check.
#   bash scripts/setup_lmms.sh        then  .venv-lmms/bin/lmms-eval --model tc_llava ...
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-lmms}" LOCK="${LOCK:-requirements/lock-lmms.txt}" \
    TORCH="${TORCH:-torch==2.14.1 torchvision==0.29.1}" bash scripts/setup.sh
"${VENV:-.venv-lmms}/bin/python" -c "import torchvision, lmms_eval.models as m; assert 'tc_llava' in m.list_available_models(); print('torchvision', torchvision.__version__, '| lmms-eval finds tc_llava')"
