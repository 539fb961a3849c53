#!/usr/bin/env bash
# The rope x mask x seed ablation on CPU: synthetic data (once), the sweep, the report.
# Extra arguments go to the sweep, e.g.  bash scripts/ablation.sh rope=mrope,videorope mask=causal
# or over a rule's parameter:           bash scripts/ablation.sh rope=tad rope.gamma=0,0.5,1
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
PY=.venv/bin/python
if [[ ! -f data_cache/ablation/train.json ]]; then
    $PY -m tc_llava.data.synthetic --out data_cache/ablation --num-train 4000 --num-eval-per-task 100 --seed 0
fi
stamp=$(date +%Y-%m-%d_%H-%M-%S)
$PY -m tc_llava.ablation "hydra.sweep.dir=outputs/multirun/ablation/$stamp" "$@"
$PY -m tc_llava.ablation.collect "outputs/multirun/ablation/$stamp"
