#!/usr/bin/env bash
# Two-GPU SFT and evaluation on a random-weight model of real shapes and synthetic videos.
#   bash scripts/bench/multi_gpu.sh [1b|7b]          (GPU: bf16, NCCL)
#   CPU_CHECK=1 bash scripts/bench/multi_gpu.sh tiny  (the same flow on CPU over gloo)
# Runs: ZeRO-2 LoRA on 1 and 2 GPUs with one global batch (loss parity), its resume,
# 1-GPU ZeRO-2 at the same per-GPU batch (scaling), ZeRO-2 and ZeRO-3 full tuning
# (memory), the ZeRO-3 export evaluated sharded on 2 GPUs and on 1. Results go to
# ${RESULTS:-scripts/bench/results}/multi_gpu.json via scripts/bench/multi_gpu_summary.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
PRESET="${1:-1b}"
WORK="${WORK:-/tmp/tc_llava_multi_gpu}"
RESULTS="${RESULTS:-scripts/bench/results}"
STEPS="${STEPS:-20}"
WORKERS="${WORKERS:-2}"          # DataLoader workers per rank
PY="${PY:-python3}"
mkdir -p "$WORK" "$RESULTS"
DATA="${DATA:-$WORK/data}"
if [ "${CPU_CHECK:-0}" = 1 ]; then
  SIZE=56; FRAMES=8; POOL="[8,2,2]"; PREC="trainer.mixed_precision=no trainer.backend=gloo"
  MODEL="model=tiny"; EVAL_MODEL_DTYPE=float32
else
  SIZE=336; FRAMES=16; POOL="[16,12,12]"; PREC="trainer.mixed_precision=bf16"
  [ -f "$WORK/ckpt/config.json" ] || $PY scripts/bench/make_checkpoint.py --out "$WORK/ckpt" --preset "$PRESET"
  MODEL="model=pretrained model.checkpoint=$WORK/ckpt model.dtype=float32"; EVAL_MODEL_DTYPE=float32
fi
[ -f "$DATA/synthetic/train.json" ] || $PY -m tc_llava.data.synthetic --out "$DATA/synthetic" --num-train 512 \
    --num-eval-per-task 16 --seed 0 --size $SIZE --num-frames 16
COMMON="$MODEL projector=pllava_pool projector.pooling_shape=$POOL data.num_frames=$FRAMES data.num_workers=$WORKERS
  paths.data=$DATA trainer.max_steps=$STEPS trainer.save_every=$((STEPS / 2)) trainer.keep_last=5 trainer.warmup_ratio=0
  trainer.lr=1e-4 trainer.projector_lr=1e-4 export.enabled=false $PREC"

train() {  # name, processes, overrides...; a fresh run replaces one of an earlier invocation
  local name=$1 procs=$2 fresh=overwrite=true; shift 2
  [[ " $* " == *" resume="* ]] && fresh=
  echo "== $name on $procs process(es)"
  $PY -m torch.distributed.run --nproc_per_node "$procs" --master_port $((29500 + RANDOM % 1000)) \
      -m tc_llava.train run_dir="$WORK/runs/$name" $COMMON $fresh "$@"
}
evaluate() {  # name, processes, export dir
  echo "== eval $1 on $2 process(es)"
  $PY -m torch.distributed.run --nproc_per_node "$2" --master_port $((29500 + RANDOM % 1000)) \
      -m tc_llava.eval benchmark=mvbench_synthetic benchmark.root="$DATA/synthetic/mvbench" \
      benchmark.num_frames=$FRAMES benchmark.batch_size=4 model=pretrained model.checkpoint="$3" \
      model.dtype=$EVAL_MODEL_DTYPE run_dir="$WORK/eval/$1"
}

LORA="tuning=lora tuning.lora.dropout=0.0"
if [ "${ONLY_SCALING:-0}" = 1 ]; then  # just the scaling pair, at per-GPU batch ${BATCH:-4}
  train scale_1proc 1 trainer=zero2 $LORA data.batch_size="${BATCH:-4}"
  train scale_2proc 2 trainer=zero2 $LORA data.batch_size="${BATCH:-4}"
  $PY - "$WORK/runs" <<'PY'
import json, statistics, sys
from pathlib import Path
rate = {n: statistics.median(json.loads(l)["samples_per_s"] for l in (Path(sys.argv[1]) / n / "metrics.jsonl").read_text().splitlines()[2:])
        for n in ("scale_1proc", "scale_2proc")}
print(json.dumps({**rate, "ratio": rate["scale_2proc"] / rate["scale_1proc"]}))
PY
  exit 0
fi
train z2_lora_1proc 1 trainer=zero2 $LORA data.batch_size=8
train z2_lora_2proc 2 trainer=zero2 $LORA data.batch_size=4
cp "$WORK/runs/z2_lora_2proc/metrics.jsonl" "$WORK/runs/z2_lora_2proc/metrics_uninterrupted.jsonl"
rm -rf "$WORK/runs/z2_lora_2proc/checkpoints/step_$STEPS"
train z2_lora_2proc 2 trainer=zero2 $LORA data.batch_size=4 resume=latest
train z2_lora_1proc_b4 1 trainer=zero2 $LORA data.batch_size=4
train z2_full_2proc 2 trainer=zero2 tuning=full data.batch_size=4
train z3_full_2proc 2 trainer=zero3 tuning=full data.batch_size=4 export.enabled=true
evaluate z3_2proc 2 "$WORK/runs/z3_full_2proc/export"
evaluate z3_1proc 1 "$WORK/runs/z3_full_2proc/export"
$PY scripts/bench/multi_gpu_summary.py "$WORK" "$RESULTS/multi_gpu${CPU_CHECK:+_cpu_check}.json"
