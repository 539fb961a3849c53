"""Full TC-LLaVA training step on one GPU: MFU, tokens/s, samples/s (bf16, batch 1).

CLIP ViT-L/336 (frozen) on 16 frames, PLLaVA pooling to 16x12x12 (2,304 visual tokens),
a 32-layer Vicuna-7B-shaped LLM trained fully (gradients on every LLM weight; the
optimizer step is left out, its cost does not depend on attention). Vanilla LLaVA (1D
RoPE, causal SDPA) is timed in the same run as the floor. MFU counts the LLM's fwd+bwd
FLOPs (6 N per token plus causal attention) and the vision tower's forward (2 N per patch)
against 989.5 TFLOP/s. Writes scripts/bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import transformers

from shapes import random_tc_llava, video_prompts

PEAK = 989.5e12


def flops(model, tokens: int, frames: int) -> float:
    lm = sum(p.numel() for p in model.language_model.parameters()) + model.hf.lm_head.weight.numel()
    vision = sum(p.numel() for p in model.hf.model.vision_tower.parameters())
    cfg = model.config.text_config
    attention = 3 * 2 * 2 * tokens * tokens * cfg.hidden_size * cfg.num_hidden_layers * 0.5
    patches = frames * (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    return 6 * lm * tokens + attention + 2 * vision * patches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = parser.parse_args()
    rows = {}
    for name, attn, tc in (("vanilla_sdpa", "sdpa", False), ("tc_sdpa", "sdpa", True), ("tc_flex", "flex_attention", True)):
        model = random_tc_llava(args.layers, attn, tc=tc)
        model.hf.model.vision_tower.requires_grad_(False)
        if args.checkpointing:
            model.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids, mask, pixels = video_prompts(model, batch=1)
        labels = ids.masked_fill(ids == model.image_token_id, -100)
        times = []
        torch.cuda.reset_peak_memory_stats()
        for i in range(args.reps + 2):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(ids, mask, pixels, labels=labels).loss.backward()
            end.record()
            torch.cuda.synchronize()
            model.zero_grad(set_to_none=True)
            if i >= 2:
                times.append(start.elapsed_time(end) / 1e3)
        step = statistics.median(times)
        tokens = ids.shape[1]
        rows[name] = {"step_s": step, "tokens_per_s": tokens / step, "samples_per_s": 1 / step,
                      "mfu": flops(model, tokens, 16) / step / PEAK,
                      "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
        print(name, json.dumps(rows[name]))
        del model
        torch.cuda.empty_cache()
    for name in ("tc_sdpa", "tc_flex"):
        rows[name]["ratio_to_vanilla"] = rows[name]["step_s"] / rows["vanilla_sdpa"]["step_s"]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "layers": args.layers, "tokens": tokens,
              "gradient_checkpointing": args.checkpointing, "statistic": "median", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
