#!/usr/bin/env bash
# The SFT loop itself on one GPU: the same 1B-preset run (CLIP ViT-L/336, 16 frames pooled
# to 16x12x12, LoRA, bf16 autocast, 336px synthetic videos) with the attention backends
# side by side, one with compiled decoder layers and 64-token length buckets, one with packed
# batches (data.packing=true). Losses should agree (bf16) and metrics.jsonl carries tokens/s,
# pad_fraction and compiled_graphs; scripts/bench/results/train_loop.json gets the medians.
#   bash scripts/bench/train_loop.sh
#   RUNS="auto auto_packed" bash scripts/bench/train_loop.sh   # a subset (ratios to the first)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK="${WORK:-/tmp/tc_llava_train_loop}"
DATA="${DATA:-data_cache/gpu}"
STEPS="${STEPS:-16}"
PY="${PY:-python3}"
RUNS="${RUNS:-sdpa auto auto_compiled auto_packed}"
NUM_TRAIN="${NUM_TRAIN:-512}"
EXTRA="${EXTRA:-}"   # more overrides for every run, e.g. data.backend=pyav where decord is missing
[ -f "$WORK/ckpt/config.json" ] || $PY scripts/bench/make_checkpoint.py --out "$WORK/ckpt" --preset 1b
[ -f "$DATA/synthetic/train.json" ] || $PY -m tc_llava.data.synthetic --out "$DATA/synthetic" --num-train "$NUM_TRAIN" \
    --num-eval-per-task 16 --seed 0 --size 336 --num-frames 16
run() {  # name, overrides...
  local name=$1; shift
  echo "== $name"
  $PY -m tc_llava.train run_dir="$WORK/runs/$name" model=pretrained model.checkpoint="$WORK/ckpt" \
      model.dtype=float32 projector=pllava_pool projector.pooling_shape=[16,12,12] data.num_frames=16 \
      data.batch_size=4 data.num_workers=4 paths.data="$DATA" trainer.max_steps=$STEPS trainer.save_every=1000 \
      trainer.warmup_ratio=0 trainer.lr=1e-4 trainer.projector_lr=1e-4 trainer.mixed_precision=bf16 \
      trainer.backend=null export.enabled=false overwrite=true $EXTRA "$@"   # a re-run of the bench replaces its runs
}
declare -A OVERRIDES=(
  [sdpa]="model.attn_implementation=sdpa"
  [auto]="model.attn_implementation=auto"
  [auto_compiled]="model.attn_implementation=auto trainer.compile=true data.collator.pad_to_multiple_of=64"
  [auto_packed]="model.attn_implementation=auto data.packing=true"
)
for name in $RUNS; do
  run "$name" ${OVERRIDES[$name]}
done
$PY - "$WORK/runs" "${RESULTS:-scripts/bench/results}/train_loop.json" $RUNS <<'PY'
import json, statistics, sys, torch, transformers
from pathlib import Path
runs, out, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
rows = {}
for name in names:
    m = [json.loads(l) for l in (runs / name / "metrics.jsonl").read_text().splitlines()]
    steady = m[len(m) // 2:]  # after warm-up and compilation
    rows[name] = {"losses": [r["loss"] for r in m], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
                  "samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
                  "pad_fraction": statistics.mean(r["pad_fraction"] for r in m),
                  "compiled_graphs": m[-1]["compiled_graphs"], "peak_mem_gb": max(r["peak_mem_gb"] for r in m)}
first = rows[names[0]]
for name in rows:
    rows[name][f"speed_vs_{names[0]}"] = rows[name]["tokens_per_s"] / first["tokens_per_s"]
    rows[name][f"max_loss_diff_vs_{names[0]}"] = max(abs(a - b) for a, b in zip(rows[name]["losses"], first["losses"]))
result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
          "statistic": "median over the second half of the steps", "runs": rows}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=1))
print(json.dumps({k: {x: v[x] for x in v if x != "losses"} for k, v in rows.items()}, indent=1))
PY
