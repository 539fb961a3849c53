#!/usr/bin/env bash
# The README demo: set up, write the synthetic videos, train the tiny TC-LLaVA on CPU,
# and evaluate the exported model on the synthetic MVBench-layout set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=2   # with threads=2 below: the same numbers on any machine
PY=.venv/bin/python
$PY -m tc_llava.data.synthetic --out data_cache/synthetic --num-train 1200 --num-eval-per-task 50 --seed 0
$PY -m tc_llava.train experiment=demo "$@"
$PY -m tc_llava.eval benchmark=mvbench_synthetic model=pretrained model.checkpoint=outputs/train/demo/export \
    threads=2 deterministic=true run_dir=outputs/eval/demo
