#!/usr/bin/env bash
# The SFT loop itself on one GPU: the same 1B-preset run (CLIP ViT-L/336, 16 frames pooled
# to 16x12x12, LoRA, bf16 autocast, 336px synthetic videos) with the attention backends
# side by side, the last with compiled decoder layers and 64-token length buckets.
# Losses should agree (bf16) and metrics.jsonl carries tokens/s and compiled_graphs;
# scripts/bench/results/train_loop.json gets the medians.
#   bash scripts/bench/train_loop.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK="${WORK:-/tmp/tc_llava_train_loop}"
DATA="${DATA:-data_cache/gpu}"
STEPS="${STEPS:-16}"
PY="${PY:-python3}"
[ -f "$WORK/ckpt/config.json" ] || $PY scripts/bench/make_checkpoint.py --out "$WORK/ckpt" --preset 1b
[ -f "$DATA/synthetic/train.json" ] || $PY -m tc_llava.data.synthetic --out "$DATA/synthetic" --num-train 512 \
    --num-eval-per-task 16 --seed 0 --size 336 --num-frames 16
run() {  # name, overrides...
  local name=$1; shift
  echo "== $name"
  $PY -m tc_llava.train run_dir="$WORK/runs/$name" model=pretrained model.checkpoint="$WORK/ckpt" \
      model.dtype=float32 projector=pllava_pool projector.pooling_shape=[16,12,12] data.num_frames=16 \
      data.batch_size=4 data.num_workers=4 paths.data="$DATA" trainer.max_steps=$STEPS trainer.save_every=1000 \
      trainer.warmup_ratio=0 trainer.lr=1e-4 trainer.projector_lr=1e-4 trainer.mixed_precision=bf16 \
      trainer.backend=null export.enabled=false overwrite=true "$@"   # a re-run of the bench replaces its runs
}
run sdpa model.attn_implementation=sdpa
run auto model.attn_implementation=auto
run auto_compiled model.attn_implementation=auto trainer.compile=true data.collator.pad_to_multiple_of=64
$PY - "$WORK/runs" "${RESULTS:-scripts/bench/results}/train_loop.json" <<'PY'
import json, statistics, sys, torch, transformers
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = {}
for name in ("sdpa", "auto", "auto_compiled"):
    m = [json.loads(l) for l in (runs / name / "metrics.jsonl").read_text().splitlines()]
    steady = m[len(m) // 2:]  # after warm-up and compilation
    rows[name] = {"losses": [r["loss"] for r in m], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
                  "samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
                  "compiled_graphs": m[-1]["compiled_graphs"], "peak_mem_gb": max(r["peak_mem_gb"] for r in m)}
for name in rows:
    rows[name]["speed_vs_sdpa"] = rows[name]["tokens_per_s"] / rows["sdpa"]["tokens_per_s"]
    rows[name]["max_loss_diff_vs_sdpa"] = max(abs(a - b) for a, b in zip(rows[name]["losses"], rows["sdpa"]["losses"]))
result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
          "statistic": "median over the second half of the steps", "runs": rows}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=1))
print(json.dumps({k: {x: v[x] for x in v if x != "losses"} for k, v in rows.items()}, indent=1))
PY
