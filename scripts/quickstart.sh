#!/usr/bin/env bash
# The README demo: set up, write the synthetic videos, train the tiny TC-LLaVA on CPU,
# and evaluate the exported model on the synthetic MVBench-layout set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The same numbers on any x86-64 machine with AVX2: 2 threads (with threads=2 below), and torch's, MKL's
# and oneDNN's kernels held at AVX2 (an AVX-512 machine otherwise computes softmax and GEMMs differently).
export OMP_NUM_THREADS=2 ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
PY=.venv/bin/python
$PY -m tc_llava.data.synthetic --out data_cache/synthetic --num-train 1200 --num-eval-per-task 50 --seed 0
$PY -m tc_llava.train experiment=demo "$@"
$PY -m tc_llava.eval benchmark=mvbench_synthetic model=pretrained model.checkpoint=outputs/train/demo/export \
    threads=2 deterministic=true run_dir=outputs/eval/demo
