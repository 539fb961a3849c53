"""Long videos on one GPU: a OneVision-7B-shaped model trained at 64 to 1,024 frames, TC rules beside vanilla rules.

Random weights of the real shape (scripts/bench/shapes.py; 196 tokens per frame, so 1,024 frames are 200,805
tokens with the 100 text tokens), bf16, batch 1, the vision tower frozen, with every long-sequence setting of
docs/long_video.md on: activation checkpointing with the checkpointed hidden states offloaded to host memory
(``trainer.offload_checkpoints``), the loss in tiles of ``model.tiling.loss_tokens`` (logits never built for the
whole sequence), the MLPs in tiles of ``model.tiling.mlp_tokens`` and the vision tower in chunks of
``model.tiling.vision_frames`` frames. Two trainings:

- ``lora``: the PLLaVA recipe of ``configs/tuning/lora.yaml`` (LoRA on the LLM, the projector trained), with the
  AdamW step;
- ``full``: gradients on every LLM weight, the optimizer step left out (as in train_step.py: AdamW's fp32
  states of a 7B LLM alone are 56 GB, a ZeRO-offload or multi-GPU matter).

Each (training, rules, frame count) runs in a fresh process, so its peak memory is its own; a training stops
growing once a length runs out of memory under both rules. Printed and written per run: step time (median),
tokens/s, peak memory allocated and reserved, and TC's step time and memory relative to vanilla's at that length.
A 1,024-frame step takes minutes, so a length is timed for up to ``--reps`` steps or ``--budget-s`` seconds of
steps (at least one), after one warm-up step unless the previous length's step already took over ``--cold-over-s``
seconds (a cold step's one-off costs are then a small part of it); each run records the steps it timed and warmed.
The JSON is rewritten after every run, so a run cut short keeps what it measured.

    python scripts/bench/long_video.py                                   # 64 ... 1024 frames, lora and full
    python scripts/bench/long_video.py --trainings lora --frames 1024    # the 1,024-frame goal alone
    python scripts/bench/long_video.py --device cpu --smoke --frames 2 4 --reps 1 --out /tmp/long.json  # CPU check
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from omegaconf import OmegaConf
from transformers import LlavaOnevisionForConditionalGeneration

from shapes import ONEVISION_VIDEO_TOKEN_ID, onevision_7b_config
from timing import cap_memory, memory_gb, times_ms
from tc_llava.model.attention import BLOCK_AUTO
from tc_llava.model.hf_compat import enable_activation_checkpointing
from tc_llava.model.masks import CausalMask, FrameBlockCausalMask
from tc_llava.model.rope import TADRoPE, VanillaRoPE
from tc_llava.model.tc_llava import TCLlava
from tc_llava.model.tiling import Tiling
from tc_llava.train.tuning import apply_tuning

FRAMES = (64, 128, 256, 512, 1024)
TRAININGS = ("lora", "full")
RULES = ("vanilla", "tc")
TEXT_BEFORE, TEXT_AFTER = 60, 40
LORA = Path(__file__).parents[2] / "tc_llava" / "configs" / "tuning" / "lora.yaml"


def config(smoke: bool):
    """The OneVision-7B shape, or (``smoke``) toy widths with the same 27x27 patch grid and 196 tokens per frame."""
    cfg = onevision_7b_config()
    if smoke:
        cfg.vision_config.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
        cfg.text_config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2))
    cfg.text_config._attn_implementation = BLOCK_AUTO
    cfg.vision_config._attn_implementation = "sdpa"
    return cfg


def measure(training: str, rules: str, frames: int, args: argparse.Namespace) -> dict:
    """One (training, rules, frames) step in this process: median step time and peak memory, or the OOM."""
    torch.manual_seed(0)
    cap_memory(args.memory_cap_gb)
    with torch.device(args.device):
        hf = LlavaOnevisionForConditionalGeneration._from_config(config(args.smoke), dtype=torch.bfloat16)
    rope, mask = (TADRoPE(1.0), FrameBlockCausalMask()) if rules == "tc" else (VanillaRoPE(), CausalMask())
    tiling = Tiling(loss_tokens=args.loss_tokens, vision_frames=args.vision_frames, mlp_tokens=args.mlp_tokens)
    model = TCLlava(hf, rope, mask, tiling=tiling).train()
    model.offload_checkpoints = args.offload
    tuning = OmegaConf.to_container(OmegaConf.load(LORA)) if training == "lora" else {"llm": "full"}
    apply_tuning(model, **tuning)
    enable_activation_checkpointing(model.hf)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5) \
        if training == "lora" else None
    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(100, 150000, (n,), generator=g).tolist()  # noqa: E731
    ids = torch.tensor([text(TEXT_BEFORE) + [ONEVISION_VIDEO_TOKEN_ID] * (frames * 196 + 1) + text(TEXT_AFTER)])
    labels = ids.masked_fill(ids == ONEVISION_VIDEO_TOKEN_ID, -100).to(args.device)
    ids = ids.to(args.device)
    pixels = torch.randn(1, frames, 3, 384, 384, generator=g).to(args.device, torch.bfloat16)

    def step():
        model(ids, None, pixels, labels=labels).loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        times = times_ms(step, 1, warmup=args.warmup, device=args.device)
        while len(times) < args.reps and sum(times) < args.budget_s * 1e3:
            times += times_ms(step, 1, device=args.device)
    except torch.cuda.OutOfMemoryError:
        return {"oom": True, "tokens": ids.shape[1], **memory_gb(args.device)}
    step_s = statistics.median(times) / 1e3
    return {"tokens": ids.shape[1], "step_s": step_s, "tokens_per_s": ids.shape[1] / step_s,
            "warmup_steps": args.warmup, "timed_steps": len(times), **memory_gb(args.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=list(FRAMES))
    parser.add_argument("--trainings", nargs="+", choices=TRAININGS, default=list(TRAININGS))
    parser.add_argument("--reps", type=int, default=3, help="timed steps per run, at most")
    parser.add_argument("--budget-s", type=float, default=60.0, help="timed steps stop once they took this long")
    parser.add_argument("--cold-over-s", type=float, default=30.0,
                        help="no warm-up step where the previous length's step took longer than this (negative: "
                             "none anywhere, for a long length run alone)")
    parser.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)  # a child's, set by the parent
    parser.add_argument("--loss-tokens", type=int, default=4096, help="model.tiling.loss_tokens")
    parser.add_argument("--vision-frames", type=int, default=64, help="model.tiling.vision_frames")
    parser.add_argument("--mlp-tokens", type=int, default=8192, help="model.tiling.mlp_tokens (0: off)")
    parser.add_argument("--no-offload", dest="offload", action="store_false", help="trainer.offload_checkpoints off")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--memory-cap-gb", type=float, help="allow this process at most this much GPU memory (GiB)")
    parser.add_argument("--smoke", action="store_true", help="toy widths of the same structure (CPU check)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "long_video.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: measure TRAINING:RULES:FRAMES, print JSON
    args = parser.parse_args()
    args.mlp_tokens = args.mlp_tokens or None
    if args.one:
        training, rules, frames = args.one.split(":")
        print(json.dumps(measure(training, rules, int(frames), args)))
        return
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    result = {"device": name, "smoke": args.smoke, "torch": torch.__version__, "transformers": transformers.__version__,
              "settings": {"loss_tokens": args.loss_tokens, "vision_frames": args.vision_frames,
                           "mlp_tokens": args.mlp_tokens, "offload_checkpoints": args.offload,
                           "activation_checkpointing": True, "memory_cap_gb": args.memory_cap_gb},
              "statistic": "median", "reps": args.reps, "budget_s": args.budget_s, "cold_over_s": args.cold_over_s}
    runs: dict[str, dict[str, dict[str, dict]]] = {}
    for training in args.trainings:
        previous_s = 0.0
        for frames in sorted(args.frames):
            rows = runs.setdefault(training, {}).setdefault(str(frames), {})
            warmup = 0 if previous_s > args.cold_over_s or args.cold_over_s < 0 else 1
            for rules in RULES:
                child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--warmup", str(warmup),
                                        "--one", f"{training}:{rules}:{frames}"], capture_output=True, text=True)
                lines = child.stdout.strip().splitlines()
                rows[rules] = json.loads(lines[-1]) if child.returncode == 0 and lines else \
                    {"error": (child.stderr.strip().splitlines() or ["failed"])[-1]}
                print(training, frames, rules, json.dumps(rows[rules]), flush=True)
            tc, vanilla = rows["tc"], rows["vanilla"]
            if "step_s" in tc and "step_s" in vanilla:
                tc["step_ratio_to_vanilla"] = tc["step_s"] / vanilla["step_s"]
                if tc["peak_mem_gb"] is not None:
                    tc["memory_ratio_to_vanilla"] = tc["peak_mem_gb"] / vanilla["peak_mem_gb"]
            largest = {t: {r: max((int(f) for f, by_rules in by_frames.items() if "step_s" in by_rules.get(r, {})),
                                  default=None) for r in RULES} for t, by_frames in runs.items()}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({**result, "largest_frames": largest, "runs": runs}, indent=1))
            if all("step_s" not in row for row in rows.values()):
                break  # neither rule trains at this length: longer ones will not either
            previous_s = max(row.get("step_s", 0.0) for row in rows.values())
    print("largest frame count that trains:", json.dumps(largest))


if __name__ == "__main__":
    main()
